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
from mmsink.pruners import REGISTRY
from mmsink.tools.loading import DTYPES, LoadError, encode, fail, load_model, parser

HERE = Path(__file__).resolve().parent
SAMPLES = HERE / "samples"
DEFAULT_MODEL = HERE.parent / "models" / "synthllava"
SHORT = "\nAnswer the question using a single word or phrase."
BASELINE_ONLY = "none (baseline only)"


class FormError(ValueError):
    """A setting of the form that cannot run, said in the form's words."""


def form_budget(budget):
    """The budget field (0 = the method's default, below 1 = a fraction, 1 or more = whole tokens)."""
    if budget in (None, ""):
        return None
    value = float(budget)
    if value == 0:
        return None
    if value < 0:
        raise FormError(
            f"The budget must be 0 (the method's default), a fraction between 0 and 1, or a "
            f"whole number of tokens; {value:g} is negative."
        )
    if value < 1:
        return value
    if value != int(value):
        raise FormError(
            f"The budget {value:g} is neither a fraction below 1 nor a whole number of tokens; "
            f"use e.g. {value / 10:.2f} or {round(value)}."
        )
    return int(value)


def form_var(text, hidden: int):
    """The VAR field: comma-separated channel numbers of this model, or empty for off."""
    if not text or not str(text).strip():
        return False
    try:
        dims = [int(d) for d in str(text).replace(" ", "").split(",") if d]
    except ValueError:
        raise FormError(
            f"VAR sink dimensions are channel numbers separated by commas (e.g. 1415, 2533), "
            f"not {str(text).strip()!r}."
        ) from None
    bad = [d for d in dims if not 0 <= d < hidden]
    if bad or not dims:
        raise FormError(
            f"VAR sink dimensions must lie between 0 and {hidden - 1} (this model's hidden "
            f"size is {hidden}); {bad[0] if bad else 'none'} given."
        )
    return {"sink_dims": dims}


def saved_text(st) -> str:
    """FLOPs saved, or what it cost when the method kept every visual token (adaptive VisiPruner may)."""
    saved = 100 * (1 - st.prefill_flops / max(st.baseline_prefill_flops, 1))
    kept_all = st.kept_tokens and all(
        k == v for layer in st.kept_tokens for k, v in zip(layer, st.visual_tokens)
    )
    if kept_all and st.visual_tokens and st.visual_tokens[0] > 0:
        cost = f"; its selection cost {-saved:.1f}% more FLOPs" if saved < 0 else ""
        return f"kept all {st.visual_tokens[0]} visual tokens in every layer{cost}"
    return f"{saved:.1f}% saved"


class Runner:
    """Holds the model and processor; ``answer`` runs one request with its own settings."""

    def __init__(self, model_path, device="cpu", dtype="float32", fast=True):
        self.model, self.processor = load_model(model_path, device, dtype)
        self.device = device
        self.lock = threading.Lock()
        # greedy decoding through mmsink.generate_fast (the same tokens as generate; static caches, CUDA
        # graphs on GPU) for both columns; VAR requests use generate (its decode-time edit lives there)
        self.fast = fast  # every supported family decodes through generate_fast
        self.context = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
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
        if isinstance(image, BadImage):
            raise FormError(image.message)
        if image is None:
            raise FormError("Choose or upload an image first.")
        if not question or not question.strip():
            raise FormError("Type a question.")
        if short and SHORT.strip() not in question:  # LLaVA's short-answer prompt (its VQA evals use it)
            question = question.rstrip() + SHORT
        image = image.convert("RGB")
        prune = None if method in (None, "", BASELINE_ONLY) else method
        budget = form_budget(budget)
        if budget is not None and (prune is None or not REGISTRY[prune].uses_budget):
            which = "The baseline-only setting" if prune is None else f"The method {prune!r}"
            raise FormError(f"{which} takes no budget: set the budget to 0 or choose a pruning method.")
        if isinstance(var, str):
            var = form_var(var, self.model.config.get_text_config().hidden_size)
        with self.lock:
            inputs = self.encode(image, question)
            n, limit = inputs["input_ids"].shape[1], self.context
            if limit and n + max_new_tokens > limit:
                raise FormError(
                    f"The question is too long for this model: with the image the prompt is {n} tokens "
                    f"and the model reads at most {limit} (answer included). Shorten the question."
                )
            fast = self.fast
            with mmsink.disabled(self.model):
                base_text, base_s = self.generate(inputs, max_new_tokens, fast)
            try:
                mmsink.wrap(self.model, prune=prune, budget=budget, var=var, sink_forward=sink_forward)
            except (
                ValueError
            ) as e:  # what the form cannot check alone (e.g. a budget above the image's tokens)
                mmsink.wrap(self.model, prune=None)
                raise FormError(f"These settings cannot run: {str(e).removeprefix('mmsink: ')}") from None
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


class BadImage:
    """An upload that is not a readable image: its message goes to the page instead of a bare 'Error'."""

    def __init__(self, message: str):
        self.message = message


def image_input(gr, **kw):
    """gr.Image whose upload of a non-image comes to ``run`` as a BadImage (Gradio's own preprocessing
    raises, and the page then shows only red 'Error' badges). The instance's preprocess is wrapped: a
    subclass would make Gradio write a .pyi stub next to this file."""
    image = gr.Image(**kw)
    plain = image.preprocess

    def preprocess(payload):
        try:
            return plain(payload)
        except Exception as e:  # PIL's UnidentifiedImageError, truncated files, ...
            name = getattr(payload, "orig_name", None) or "the file"
            return BadImage(
                f"{name} is not an image this demo can read ({type(e).__name__}); upload a PNG, JPEG or "
                "WebP image."
            )

    image.preprocess = preprocess
    return image


def build(runner: Runner):
    import gradio as gr

    def run(image, question, method, budget, var_dims, sink_forward, short):
        try:
            r = runner.answer(
                image, question, method, budget, var_dims, bool(sink_forward), short=bool(short)
            )
        except FormError as e:
            return "", "", "", "", None, None, f"**Cannot run:** {e}"
        except Exception as e:  # shown in the page; the app keeps running
            return "", "", "", "", None, None, f"**Error:** {type(e).__name__}: {e}"
        st = r["stats"]
        base_info = (
            f"prefill FLOPs: {st.baseline_prefill_flops / 1e9:.3f} G · latency {1e3 * r['baseline_s']:.0f} ms"
        )
        info = (
            f"prefill FLOPs: {st.prefill_flops / 1e9:.3f} G ({saved_text(st)}) · latency "
            f"{1e3 * r['seconds']:.0f} ms · visual tokens in the last layer: {st.kept_tokens[-1][0]}"
        )
        return r["baseline"], base_info, r["answer"], info, kept_plot(st), overlay(runner, r), ""

    with gr.Blocks(title="mmsink demo") as app:
        gr.Markdown("# mmsink: same answers from fewer visual tokens")
        with gr.Row():
            with gr.Column(min_width=280):
                image = image_input(gr, type="pil", label="image", elem_id="image", height=280)
                examples = gr.Column()
            with gr.Column(min_width=280):
                question = gr.Textbox(label="question", elem_id="question")
                method = gr.Dropdown(
                    [BASELINE_ONLY, *(m for m in mmsink.methods() if m != "replay")],  # replay needs a plan
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
                error = gr.Markdown(elem_id="error")  # where the click was: the form's messages
        if samples():
            with examples:  # under the image, so that the answers follow the form closely
                gr.Examples(samples(), inputs=[image, question], label="samples", examples_per_page=4)
        # the two answers in two columns at every common width (each column needs only 240 px)
        with gr.Row(equal_height=False, elem_id="results"):
            with gr.Column(min_width=240, elem_id="base_col"):
                gr.Markdown("### baseline")
                base_answer = gr.Textbox(label="answer", elem_id="base_answer")
                base_info = gr.Markdown(elem_id="base_info")
            with gr.Column(min_width=240, elem_id="mmsink_col"):
                gr.Markdown("### mmsink")
                answer = gr.Textbox(label="answer", elem_id="answer")
                info = gr.Markdown(elem_id="info")
        with gr.Row():
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
