"""Gradio demo: the baseline answer and the mmsink answer side by side, with prefill FLOPs, latency,
visual tokens kept per layer and the image with the kept tokens highlighted.

    mmsink demo [--model PATH] [--device cpu] [--dtype float32] [--port 7860]
    python demo/app.py ...

One model in memory serves both columns (``mmsink.disabled`` gives the baseline). Each request's settings
are applied inside a lock for that request only, and Gradio's queue runs one request at a time, so
concurrent users never see each other's settings.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import mmsink
from mmsink.tools.loading import DTYPES, LoadError, encode, fail, load_model, parser

HERE = Path(__file__).resolve().parent
SAMPLES = HERE / "samples"
DEFAULT_MODEL = HERE.parent / "models" / "synthllava"
SHORT = "\nAnswer the question using a single word or phrase."


class Runner:
    """Holds the model and processor; ``answer`` runs one request with its own settings."""

    def __init__(self, model_path, device="cpu", dtype="float32", fast=True):
        self.model, self.processor = load_model(model_path, device, dtype)
        self.device = device
        self.lock = threading.Lock()
        # greedy decoding through mmsink.generate_fast (the same tokens as generate; static caches, CUDA
        # graphs on GPU) for both columns; VAR requests use generate (its decode-time edit lives there)
        self.fast = fast  # every supported family decodes through generate_fast
        mmsink.wrap(self.model, prune=None)

    def encode(self, image: Image.Image, question: str):
        return encode(self.processor, image, question, self.device)

    def generate(self, inputs, max_new_tokens, fast=False):
        t = time.perf_counter()
        with torch.no_grad():
            if fast:
                out = mmsink.generate_fast(self.model, max_new_tokens=max_new_tokens, **inputs)
            else:
                out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        if self.device != "cpu" and torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        text = self.processor.tokenizer.decode(
            out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        return text.strip(), seconds

    def answer(self, image, question, method, budget, var, sink_forward, max_new_tokens=16, short=True):
        if image is None:
            raise ValueError("Choose or upload an image first.")
        if not question or not question.strip():
            raise ValueError("Type a question.")
        if short and SHORT.strip() not in question:  # LLaVA's short-answer prompt (its VQA evals use it)
            question = question.rstrip() + SHORT
        image = image.convert("RGB")
        prune = None if method in (None, "", "none (baseline only)") else method
        budget = None if budget in (None, 0, "") else budget
        if budget is not None and float(budget) < 1:
            budget = float(budget)
        elif budget is not None:
            budget = int(budget)
        with self.lock:
            inputs = self.encode(image, question)
            fast = self.fast
            with mmsink.disabled(self.model):
                base_text, base_s = self.generate(inputs, max_new_tokens, fast)
            mmsink.wrap(self.model, prune=prune, budget=budget, var=var, sink_forward=sink_forward)
            try:
                text, seconds = self.generate(inputs, max_new_tokens, fast)
                st = mmsink.stats(self.model)
            finally:
                mmsink.wrap(self.model, prune=None)
        return {
            "baseline": base_text,
            "answer": text,
            "baseline_s": base_s,
            "seconds": seconds,
            "stats": st,
            "pixel_values": inputs.get("pixel_values"),
            "input_ids": inputs["input_ids"],
        }


def processed_image(runner, pixel_values) -> Image.Image:
    """The image as the model saw it (after resize / crop), for the token overlay."""
    ip = runner.processor.image_processor
    mean = torch.tensor(getattr(ip, "image_mean", [0.5] * 3))[:, None, None]
    std = torch.tensor(getattr(ip, "image_std", [0.5] * 3))[:, None, None]
    x = pixel_values[0].float().cpu()
    if x.dim() == 4:  # tiled (LLaVA-NeXT): the base tile
        x = x[0]
    x = (x * std + mean).clamp(0, 1)
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).astype(np.uint8))


def overlay(runner, result) -> Image.Image | None:
    """Kept visual tokens (at the deepest layer that still has visual tokens) bright, dropped ones dimmed;
    ViT-sink tokens outlined in red. Drawn for models with one square token grid per image."""
    st, pv = result["stats"], result["pixel_values"]
    if pv is None or pv.dim() != 4 or not st.visual_tokens or st.visual_tokens[0] == 0:
        return None
    img = processed_image(runner, pv).convert("RGBA")
    ids = result["input_ids"][0]
    positions = (ids == runner.model.config.image_token_id).nonzero().flatten().tolist()
    side = int(round(len(positions) ** 0.5))
    if side * side != len(positions):
        return img.convert("RGB")
    kept_layers = [row[0] for row in st.kept_indices if row[0]]
    kept = set(kept_layers[-1]) if kept_layers else set()
    sinks = {s["position"] for s in st.extra.get("vit_sinks", [[]])[0]}
    cell = img.width / side
    shade = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    for j, pos in enumerate(positions):
        r, c = divmod(j, side)
        box = [c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1]
        if pos not in kept:
            draw.rectangle(box, fill=(0, 0, 0, 150))
        if pos in sinks:
            draw.rectangle(box, outline=(255, 0, 0, 255), width=2)
    return Image.alpha_composite(img, shade).convert("RGB")


def kept_plot(stats):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.6))
    ax.plot([row[0] for row in stats.kept_tokens], marker="o")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("visual tokens")
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    return fig


def samples() -> list:
    index = SAMPLES / "samples.json"
    if not index.exists():
        return []
    return [[str(SAMPLES / s["image"]), s["question"]] for s in json.loads(index.read_text())]


def build(runner: Runner):
    import gradio as gr

    def run(image, question, method, budget, var_dims, sink_forward, short):
        try:
            var = (
                {"sink_dims": [int(d) for d in var_dims.split(",")]}
                if var_dims and var_dims.strip()
                else False
            )
            r = runner.answer(image, question, method, budget, var, bool(sink_forward), short=bool(short))
        except Exception as e:  # shown in the page; the app keeps running
            return "", "", "", "", None, None, f"Error: {e}"
        st = r["stats"]
        saved = 100 * (1 - st.prefill_flops / max(st.baseline_prefill_flops, 1))
        base_info = (
            f"prefill FLOPs: {st.baseline_prefill_flops / 1e9:.3f} G · latency {1e3 * r['baseline_s']:.0f} ms"
        )
        info = (
            f"prefill FLOPs: {st.prefill_flops / 1e9:.3f} G ({saved:.1f}% saved) · latency "
            f"{1e3 * r['seconds']:.0f} ms · visual tokens in the last layer: {st.kept_tokens[-1][0]}"
        )
        return r["baseline"], base_info, r["answer"], info, kept_plot(st), overlay(runner, r), ""

    with gr.Blocks(title="mmsink demo") as app:
        gr.Markdown("# mmsink: same answers from fewer visual tokens")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="image", elem_id="image")
                question = gr.Textbox(label="question", elem_id="question")
                method = gr.Dropdown(
                    ["none (baseline only)", *(m for m in mmsink.methods() if m != "replay")],  # needs a plan
                    value="visipruner",
                    label="method",
                    elem_id="method",
                )
                budget = gr.Number(
                    value=0,
                    label="budget (0 = method default; <1 = fraction; >=1 = tokens)",
                    elem_id="budget",
                )
                var = gr.Textbox(
                    value="", label="VAR sink dimensions (comma-separated; empty = off)", elem_id="var"
                )
                sink = gr.Checkbox(value=False, label="ViT-sink forwarding", elem_id="sink")
                short = gr.Checkbox(
                    value=True, label=f"short answer (appends '{SHORT.strip()}')", elem_id="short"
                )
                go = gr.Button("Run", variant="primary", elem_id="run")
                if samples():
                    gr.Examples(samples(), inputs=[image, question], label="samples")
            with gr.Column():
                error = gr.Markdown(elem_id="error")
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("### baseline")
                        base_answer = gr.Textbox(label="answer", elem_id="base_answer")
                        base_info = gr.Markdown(elem_id="base_info")
                    with gr.Column():
                        gr.Markdown("### mmsink")
                        answer = gr.Textbox(label="answer", elem_id="answer")
                        info = gr.Markdown(elem_id="info")
                plot = gr.Plot(label="visual tokens kept per layer", elem_id="plot")
                over = gr.Image(label="kept tokens (dimmed: dropped; red: ViT sinks)", elem_id="overlay")
        go.click(
            run,
            [image, question, method, budget, var, sink, short],
            [base_answer, base_info, answer, info, plot, over, error],
        )
    return app.queue(default_concurrency_limit=1)


def serve_in_background(runner: Runner, host: str = "127.0.0.1", wait_s: float = 20.0):
    """Start the app on a free local port in a daemon thread; (app, port) once it accepts connections
    or ``wait_s`` has passed. Used by the browser test and the README screenshot."""
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    app = build(runner)
    threading.Thread(
        target=lambda: app.launch(server_name=host, server_port=port, prevent_thread_lock=True), daemon=True
    ).start()
    for _ in range(int(wait_s / 0.1)):
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return app, port


def main(argv=None):
    ap = parser("demo", __doc__)
    ap.add_argument(
        "--model", default=str(DEFAULT_MODEL), help="local checkpoint folder (default: the bundled one)"
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype (default float32)")
    ap.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)"
    )
    ap.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    ap.add_argument("--no-fast", action="store_true", help="decode with model.generate, not generate_fast")
    a = ap.parse_args(argv)
    try:
        runner = Runner(a.model, a.device, a.dtype, fast=not a.no_fast)
    except LoadError as e:
        fail("demo", e)
    app = build(runner)
    app.launch(server_name=a.host, server_port=a.port)


if __name__ == "__main__":
    main()
