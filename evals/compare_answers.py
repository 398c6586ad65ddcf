"""Compare two answers files question by question: how many answers differ, and the first few.

python evals/compare_answers.py a.jsonl b.jsonl
"""

import json
import sys


def load(path):
    # read only: vqa.read_answers would rewrite a file with a torn last line
    with open(path, encoding="utf-8") as f:
        return {str(r["question_id"]): r for r in (json.loads(line) for line in f if line.strip())}


def main(argv=None):
    a_path, b_path = (argv or sys.argv[1:])[:2]
    a, b = load(a_path), load(b_path)
    common = [q for q in a if q in b]
    diff = [q for q in common if a[q]["text"] != b[q]["text"]]
    print(f"{len(common)} questions in both ({len(a)} / {len(b)}); answers differ on {len(diff)}")
    for q in diff[:5]:
        print(f"  {q}: {a[q]['text']!r} vs {b[q]['text']!r}")


if __name__ == "__main__":
    main()
