"""A small inference service: a trained tiny CLIP behind FastAPI, with dynamic batching.

1. ``save_clip_bundle`` / ``load_clip_bundle``: the model's weights as safetensors, its
   config and vocabulary as JSON, and optionally a gallery of image embeddings for
   retrieval, in one folder. Loading runs no pickle.
2. ``DynamicBatcher``: requests that arrive within a short window (``batch_window_ms``) run
   as one batch, up to ``max_batch_size``; switched off, every request runs on its own.
3. ``create_app``: the FastAPI app. ``POST /classify`` (zero-shot classification of one
   image among the labels sent), ``POST /retrieve`` (the gallery images closest to a text),
   ``POST /caption`` (chapter 10's captioner, greedy decoding; ``save_captioner_bundle`` /
   ``load_captioner_bundle`` store it as safetensors and JSON), ``GET /health``. Bad
   requests get a 4xx with a message saying what was expected.
4. ``start_server`` / ``stop_server`` / ``serving``: uvicorn in a background thread on
   127.0.0.1 (never another interface), on a free port, always stopped.
5. ``run_load``: a bounded load generator with ``httpx``: a fixed number of requests at a
   fixed concurrency, then it stops; latencies and throughput.

Axis letters: B batch, S image side, E shared embedding width, G gallery images, C labels,
T prompt templates.

Taught in notebooks/13_efficient_inference_and_deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor

from mmcourse.captioning import Captioner, CaptionerConfig, generate_text
from mmcourse.clip import TinyClip, TinyClipConfig, WordTokenizer, zero_shot_scores
from mmcourse.deploy import LatencyStats
from mmcourse.generation import GenerationConfig
from mmcourse.utils import positive_float, positive_int

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

# --- 1. the model on disk -----------------------------------------------------------------


@dataclass
class ClipBundle:
    """What the service serves: a CLIP, its tokenizer and an optional retrieval gallery."""

    model: TinyClip  # in eval mode, on the CPU
    tokenizer: WordTokenizer  # the vocabulary the text tower was trained with
    gallery_embeds: Tensor | None = None  # (G, E) unit-norm image embeddings, or None
    gallery_captions: list[str] = field(default_factory=list)  # G captions (for display)


def save_clip_bundle(
    folder: str | Path,
    model: TinyClip,
    tokenizer: WordTokenizer,
    *,
    gallery_embeds: Tensor | None = None,
    gallery_captions: Sequence[str] = (),
    overwrite: bool = False,
) -> Path:
    """Write ``model.safetensors``, ``config.json`` (and ``gallery.safetensors``) to ``folder``.

    Args:
        folder: created if missing; refuses to replace a bundle unless ``overwrite``.
        model: a :class:`TinyClip` with a from-scratch text tower.
        tokenizer: its :class:`WordTokenizer`.
        gallery_embeds: (G, E) image embeddings that ``/retrieve`` searches (normalised here).
        gallery_captions: G captions shown with the results (optional).
        overwrite: replace the files of an existing bundle.

    Returns:
        The folder.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """
    from safetensors.torch import save_file

    if not isinstance(model, TinyClip) or model.config.text_tower != "scratch":
        raise ValueError(
            "expected a TinyClip with a from-scratch text tower (text_tower='scratch')"
        )
    folder = Path(folder)
    files = [folder / "model.safetensors", folder / "config.json", folder / "gallery.safetensors"]
    if not overwrite and any(f.exists() for f in files):
        raise FileExistsError(f"{folder} already holds a bundle; pass overwrite=True to replace it")
    if gallery_embeds is not None:
        if gallery_embeds.dim() != 2 or gallery_embeds.shape[1] != model.config.embed_dim:
            raise ValueError(
                f"expected gallery_embeds of shape (G, {model.config.embed_dim}), got "
                f"{tuple(gallery_embeds.shape)}"
            )
        if gallery_captions and len(gallery_captions) != len(gallery_embeds):
            raise ValueError(
                f"got {len(gallery_captions)} gallery captions for {len(gallery_embeds)} images"
            )
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(files[0]))
    config = {
        "clip": asdict(model.config),
        "vocab": tokenizer.id_to_token[5:],  # the words, after the 5 special tokens
        "gallery_captions": list(gallery_captions),
    }
    files[1].write_text(json.dumps(config, indent=1))
    if gallery_embeds is not None:
        embeds = F.normalize(gallery_embeds.detach().float().cpu(), dim=-1).contiguous()
        save_file({"embeddings": embeds}, str(files[2]))
    elif files[2].exists():
        files[2].unlink()  # overwrite=True: a stale gallery must not outlive its model
    return folder


def load_clip_bundle(folder: str | Path) -> ClipBundle:
    """Load what :func:`save_clip_bundle` wrote (safetensors and JSON: no pickle).

    Taught in notebooks/13_efficient_inference_and_deployment.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in ("model.safetensors", "config.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"no {name} in {folder}: not a bundle of save_clip_bundle")
    config = json.loads((folder / "config.json").read_text())
    model = TinyClip(TinyClipConfig(**config["clip"]))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    gallery = folder / "gallery.safetensors"
    embeds = load_file(str(gallery))["embeddings"] if gallery.is_file() else None
    return ClipBundle(
        model=model.eval(),
        tokenizer=WordTokenizer(config["vocab"]),
        gallery_embeds=embeds,
        gallery_captions=list(config.get("gallery_captions", [])),
    )


@dataclass
class CaptionerBundle:
    """A captioner to serve: chapter 10's model and the tokenizer it was trained with."""

    model: Captioner  # in eval mode, on the CPU
    tokenizer: WordTokenizer  # its vocabulary


CAPTIONER_FILES = ("captioner.safetensors", "captioner.json")


def save_captioner_bundle(
    folder: str | Path, model: Captioner, tokenizer: WordTokenizer, *, overwrite: bool = False
) -> Path:
    """Write ``captioner.safetensors`` and ``captioner.json`` (config, vocabulary) to ``folder``.

    The names differ from :func:`save_clip_bundle`'s, so one folder can hold both.

    Args:
        folder: created if missing; refuses to replace a captioner unless ``overwrite``.
        model: a :class:`mmcourse.captioning.Captioner`.
        tokenizer: its :class:`WordTokenizer` (``vocab_size`` must match the model's).
        overwrite: replace the files of an existing captioner.

    Returns:
        The folder.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """
    from safetensors.torch import save_file

    if not isinstance(model, Captioner):
        raise ValueError(f"expected a Captioner, got {type(model).__name__}")
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, the captioner's vocabulary "
            f"{model.config.vocab_size}: not the tokenizer it was trained with"
        )
    folder = Path(folder)
    files = [folder / name for name in CAPTIONER_FILES]
    if not overwrite and any(f.exists() for f in files):
        raise FileExistsError(
            f"{folder} already holds a captioner; pass overwrite=True to replace it"
        )
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(files[0]))
    config = {"captioner": asdict(model.config), "vocab": tokenizer.id_to_token[5:]}
    files[1].write_text(json.dumps(config, indent=1))
    return folder


def load_captioner_bundle(folder: str | Path) -> CaptionerBundle:
    """Load what :func:`save_captioner_bundle` wrote (safetensors and JSON: no pickle).

    Taught in notebooks/13_efficient_inference_and_deployment.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in CAPTIONER_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"no {name} in {folder}: not a folder of save_captioner_bundle")
    config = json.loads((folder / CAPTIONER_FILES[1]).read_text())
    model = Captioner(CaptionerConfig(**config["captioner"]))
    model.load_state_dict(load_file(str(folder / CAPTIONER_FILES[0])))
    return CaptionerBundle(model=model.eval(), tokenizer=WordTokenizer(config["vocab"]))


# --- 2. dynamic batching ------------------------------------------------------------------


class DynamicBatcher:
    """Collects requests for a short window and runs them as one batch.

    The first request to arrive opens a window of ``window_s`` seconds; every request that
    arrives before it closes (up to ``max_batch_size``) joins the batch, which then runs in a
    worker thread with ``fn(items)``. Each caller gets its own result back. With
    ``enabled=False`` every request calls ``fn([item])`` on its own, at once.

    Args:
        fn: maps a list of items to a list of results of the same length.
        max_batch_size: the largest batch.
        window_s: how long the first request of a batch waits for company.
        enabled: batch (True) or not.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """

    def __init__(
        self,
        fn: Callable[[list[Any]], list[Any]],
        *,
        max_batch_size: int = 32,
        window_s: float = 0.005,
        enabled: bool = True,
    ) -> None:
        positive_int(max_batch_size=max_batch_size)
        positive_float(window_s=window_s)
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self.enabled = enabled
        self.batch_sizes: list[int] = []  # the size of every batch run so far
        self.busy_s = 0.0  # seconds spent inside fn so far (the model's share of the work)
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, item: Any) -> Any:
        """The result of ``fn`` for ``item``, computed alone or in a batch."""
        if not self.enabled:
            self.batch_sizes.append(1)
            return (await asyncio.to_thread(self._timed, [item]))[0]
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._worker())
        future = loop.create_future()
        await self._queue.put((item, future))
        return await future

    async def _worker(self) -> None:
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except TimeoutError:
                    break
            items = [item for item, _ in batch]
            self.batch_sizes.append(len(items))
            try:
                results = await asyncio.to_thread(self._timed, items)
            except Exception as err:  # every caller of the batch gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    def _timed(self, items: list[Any]) -> list[Any]:
        start = time.perf_counter()
        try:
            return self.fn(items)
        finally:
            self.busy_s += time.perf_counter() - start

    async def aclose(self) -> None:
        """Stop the worker (the app's shutdown calls this)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None


# --- 3. the app ---------------------------------------------------------------------------


@dataclass
class ServeConfig:
    """How the service runs.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """

    dynamic_batching: bool = True  # batch requests that arrive within the window
    max_batch_size: int = 32  # the largest batch of images (or texts) run at once
    batch_window_ms: float = 5.0  # how long the first request of a batch waits for more
    max_labels: int = 256  # the most labels one /classify request may send
    max_k: int = 100  # the most results one /retrieve request may ask for

    def __post_init__(self) -> None:
        positive_int(
            max_batch_size=self.max_batch_size, max_labels=self.max_labels, max_k=self.max_k
        )
        positive_float(batch_window_ms=self.batch_window_ms)


class ClassifyRequest(BaseModel):
    """The body of ``POST /classify``."""

    image: Any  # (3, S, S) nested list in [0, 1], checked by parse_image
    labels: list[str]  # the C class names to choose among
    templates: list[str] = ["a {}"]  # T prompt templates, each with one "{}" for the label
    ensemble: str = "max"  # "max" or "mean" over the templates (chapter 06)


class RetrieveRequest(BaseModel):
    """The body of ``POST /retrieve``."""

    text: str  # the query
    k: int = 5  # how many gallery images to return


class CaptionRequest(BaseModel):
    """The body of ``POST /caption``."""

    image: Any  # (3, S, S) nested list in [0, 1], checked by parse_image
    max_new_tokens: int = 20  # the longest caption, the end token included


class BadRequest(Exception):
    """A request the service cannot answer; the message says what was expected."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


def parse_image(value: Any, image_size: int) -> Tensor:
    """A JSON image, a nested list of shape (3, S, S) with values in [0, 1] -> a tensor.

    Raises:
        BadRequest: anything else, with a message naming the expected shape.
    """
    expected = f"(3, {image_size}, {image_size})"
    try:
        image = torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise BadRequest(
            f"image must be a nested list of numbers of shape {expected} (channels, height, "
            f"width), values in [0, 1]; could not read it as one: {err}"
        ) from err
    if tuple(image.shape) != (3, image_size, image_size):
        raise BadRequest(
            f"expected an image of shape {expected} (channels, height, width), "
            f"got {tuple(image.shape)}"
        )
    if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        raise BadRequest("image values must be finite numbers in [0, 1]")
    return image


def create_app(
    bundle: ClipBundle | str | Path,
    config: ServeConfig | None = None,
    *,
    captioner: CaptionerBundle | str | Path | None = None,
) -> Any:
    """The FastAPI app serving zero-shot classification and retrieval with a tiny CLIP.

    Endpoints (JSON in, JSON out):

    * ``POST /classify`` ``{"image": [[[...]]], "labels": ["red circle", ...],
      "templates": ["a {}"], "ensemble": "max"}`` -> ``{"label", "scores": {label: cosine}}``.
      The image is a (3, S, S) nested list in [0, 1]; each label is written into every
      template (a prompt ensemble, chapter 06) and scored with ``zero_shot_scores``.
    * ``POST /retrieve`` ``{"text": "a red circle on the left", "k": 5}`` -> ``{"results":
      [{"index", "caption", "score"}]}``: the k gallery images closest to the text.
    * ``POST /caption`` ``{"image": [[[...]]], "max_new_tokens": 20}`` -> ``{"caption",
      "num_tokens", "stopped"}`` (only with a ``captioner``): chapter 10's captioner decodes
      greedily (:func:`mmcourse.captioning.generate_text`, :mod:`mmcourse.generation`) for
      at most ``max_new_tokens`` tokens; ``num_tokens`` counts the words written,
      ``stopped`` says whether it wrote its end token within the limit.
    * ``GET /health``: status, whether batching is on, the batch sizes run so far.

    Image embeddings (``/classify``), text embeddings (``/retrieve``) and captions
    (``/caption``) each go through a :class:`DynamicBatcher`; a batch of captions is
    decoded together for the largest ``max_new_tokens`` asked and each is cut to its own
    (greedy decoding of one row does not depend on the others, and a shorter limit only
    stops it earlier). Label prompts are embedded once per distinct label set and cached.

    Args:
        bundle: a :class:`ClipBundle` or the folder of one (loaded with safetensors).
        config: :class:`ServeConfig`; the defaults if None.
        captioner: a :class:`CaptionerBundle` or the folder of one; None: no ``/caption``
            (it answers 404).

    Returns:
        The ``fastapi.FastAPI`` app.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    config = ServeConfig() if config is None else config
    if not isinstance(bundle, ClipBundle):
        bundle = load_clip_bundle(bundle)
    model, tokenizer = bundle.model.eval(), bundle.tokenizer
    image_size = model.config.image_size
    max_length = model.config.max_text_length
    window_s = config.batch_window_ms / 1e3

    def embed_images(images: list[Tensor]) -> list[Tensor]:
        with torch.inference_mode():
            embeds = F.normalize(model.encode_image(torch.stack(images)), dim=-1)  # (B, E)
        return list(embeds)

    def embed_texts(texts: list[str]) -> list[Tensor]:
        with torch.inference_mode():
            tokens = tokenizer(texts, max_length=max_length)
            embeds = F.normalize(model.encode_text(tokens), dim=-1)  # (B, E)
        return list(embeds)

    if captioner is not None and not isinstance(captioner, CaptionerBundle):
        captioner = load_captioner_bundle(captioner)
    if captioner is not None:
        captioner.model.eval()
    longest_caption = 0 if captioner is None else captioner.model.config.max_length - 1

    def caption_images(items: list[tuple[Tensor, int]]) -> list[dict[str, Any]]:
        """Greedy captions of a batch of (image, max_new_tokens), each cut to its limit."""
        model, words = captioner.model, captioner.tokenizer
        images = torch.stack([image for image, _ in items])  # (B, 3, S, S)
        steps = GenerationConfig(max_new_tokens=max(n for _, n in items))
        with torch.inference_mode():
            _, out = generate_text(model, words, images=images, config=steps)
        eos = model.config.eos_token_id
        answers = []
        for row, (_, limit) in zip(out.generated.tolist(), items, strict=True):
            row = row[:limit]
            stopped = eos in row
            row = row[: row.index(eos)] if stopped else row
            answers.append(
                {"caption": words.decode(row), "num_tokens": len(row), "stopped": stopped}
            )
        return answers

    functions = [("images", embed_images), ("texts", embed_texts)]
    if captioner is not None:
        functions.append(("captions", caption_images))
    batchers = {
        name: DynamicBatcher(
            fn,
            max_batch_size=config.max_batch_size,
            window_s=window_s,
            enabled=config.dynamic_batching,
        )
        for name, fn in functions
    }
    prompt_cache: dict[tuple[tuple[str, ...], tuple[str, ...]], Tensor] = {}
    cache_lock = threading.Lock()

    def prompt_embeds(labels: tuple[str, ...], templates: tuple[str, ...]) -> Tensor:
        """(C, T, E) unit-norm embeddings of every label in every template, cached."""
        key = (labels, templates)
        with cache_lock:
            if key in prompt_cache:
                return prompt_cache[key]
        prompts = [t.format(label) for label in labels for t in templates]
        embeds = torch.stack(embed_texts(prompts)).reshape(len(labels), len(templates), -1)
        with cache_lock:
            if len(prompt_cache) > 1024:
                prompt_cache.clear()
            prompt_cache[key] = embeds
        return embeds

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        yield
        for batcher in batchers.values():
            await batcher.aclose()

    app = FastAPI(title="mmcourse tiny CLIP", lifespan=lifespan)
    app.state.batchers = batchers
    app.state.config = config

    @app.exception_handler(BadRequest)
    async def bad_request(_request: Request, err: BadRequest) -> JSONResponse:
        return JSONResponse(status_code=err.status_code, content={"detail": str(err)})

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(
                status_code=400,
                content={
                    "detail": "the request body is not valid JSON; send a JSON object with "
                    "Content-Type: application/json"
                },
            )
        parts = []
        for e in errors:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        return JSONResponse(status_code=422, content={"detail": "; ".join(parts)})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        sizes = batchers["images"].batch_sizes
        return {
            "status": "ok",
            "dynamic_batching": config.dynamic_batching,
            "image_size": image_size,
            "image_batches": len(sizes),
            "mean_image_batch_size": sum(sizes) / len(sizes) if sizes else 0.0,
            "gallery_size": 0 if bundle.gallery_embeds is None else len(bundle.gallery_embeds),
            "captioning": captioner is not None,
        }

    @app.post("/classify")
    async def classify(request: ClassifyRequest) -> dict[str, Any]:
        labels = [label.strip() for label in request.labels]
        if not labels:
            raise BadRequest("labels must be a non-empty list of class names, got []")
        if any(not label for label in labels):
            raise BadRequest("every label must be a non-empty string")
        if len(set(labels)) != len(labels):
            raise BadRequest("labels must be distinct")
        if len(labels) > config.max_labels:
            raise BadRequest(f"at most {config.max_labels} labels per request, got {len(labels)}")
        if not request.templates or any(t.count("{}") != 1 for t in request.templates):
            raise BadRequest(
                "templates must be a non-empty list of strings with one '{}' each, e.g. 'a {}'"
            )
        if request.ensemble not in ("max", "mean"):
            raise BadRequest(f"ensemble must be 'max' or 'mean', got {request.ensemble!r}")
        image = parse_image(request.image, image_size)
        prompts = asyncio.to_thread(prompt_embeds, tuple(labels), tuple(request.templates))
        image_embed, label_embeds = await asyncio.gather(batchers["images"].submit(image), prompts)
        scores = zero_shot_scores(image_embed[None], label_embeds, ensemble=request.ensemble)[0]
        return {
            "label": labels[int(scores.argmax())],
            "scores": {label: float(s) for label, s in zip(labels, scores, strict=True)},
        }

    @app.post("/retrieve")
    async def retrieve(request: RetrieveRequest) -> dict[str, Any]:
        gallery = bundle.gallery_embeds
        if gallery is None:
            raise BadRequest("this server has no gallery to retrieve from", status_code=404)
        if not request.text.strip():
            raise BadRequest("text must be a non-empty string")
        if not 1 <= request.k <= min(config.max_k, len(gallery)):
            raise BadRequest(
                f"k must be in [1, {min(config.max_k, len(gallery))}], got {request.k}"
            )
        query = await batchers["texts"].submit(request.text)  # (E,)
        scores, index = (gallery @ query).topk(request.k)  # (k,)
        captions = bundle.gallery_captions
        return {
            "results": [
                {"index": int(i), "caption": captions[i] if captions else "", "score": float(s)}
                for s, i in zip(scores, index.tolist(), strict=True)
            ]
        }

    @app.post("/caption")
    async def caption(request: CaptionRequest) -> dict[str, Any]:
        if captioner is None:
            raise BadRequest(
                "this server has no captioner; start it with create_app(..., captioner=folder)",
                status_code=404,
            )
        if not 1 <= request.max_new_tokens <= longest_caption:
            raise BadRequest(
                f"max_new_tokens must be an integer in [1, {longest_caption}] (the captioner's "
                f"max_length minus the start token), got {request.max_new_tokens}"
            )
        image = parse_image(request.image, captioner.model.config.image_size)
        return await batchers["captions"].submit((image, request.max_new_tokens))

    return app


# --- 4. a server on 127.0.0.1, always stopped ---------------------------------------------


@dataclass
class RunningServer:
    """A uvicorn server running in a background thread."""

    url: str  # e.g. http://127.0.0.1:54321
    server: Any  # the uvicorn.Server
    thread: threading.Thread
    sock: socket.socket  # the listening socket, bound to the loopback interface


def start_server(
    app: Any, *, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 20.0
) -> RunningServer:
    """Start uvicorn with ``app`` in a daemon thread, listening on loopback only.

    Args:
        app: an ASGI app (e.g. :func:`create_app`).
        host: a loopback address; anything else is refused (nothing here listens on a
            network interface).
        port: 0 picks a free port (the socket is bound here, so no other process can take
            it between choosing and listening).
        timeout_s: how long to wait for the server to start.

    Returns:
        :class:`RunningServer`; stop it with :func:`stop_server`, or use :func:`serving`.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """
    import uvicorn

    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"host must be a loopback address {LOOPBACK_HOSTS}, got {host!r}")
    family = socket.AF_INET6 if host == "::1" else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1" if host == "localhost" else host, port))
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False)
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout=5)
            sock.close()
            raise RuntimeError(f"the server did not start within {timeout_s} s")
        time.sleep(0.01)
    shown = f"[{host}]" if host == "::1" else "127.0.0.1"
    return RunningServer(
        url=f"http://{shown}:{bound_port}", server=server, thread=thread, sock=sock
    )


def stop_server(running: RunningServer, *, timeout_s: float = 20.0) -> None:
    """Ask the server to exit, wait for its thread and close its socket."""
    running.server.should_exit = True
    running.thread.join(timeout=timeout_s)
    running.sock.close()
    if running.thread.is_alive():
        raise RuntimeError(f"the server at {running.url} did not stop within {timeout_s} s")


@contextlib.contextmanager
def serving(app: Any, **kwargs: Any) -> Iterator[str]:
    """``with serving(app) as url:`` runs the server for the block and always stops it.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """
    running = start_server(app, **kwargs)
    try:
        yield running.url
    finally:
        stop_server(running)


# --- 5. a bounded load generator ----------------------------------------------------------


@dataclass
class LoadResult:
    """What a bounded load measured.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """

    latencies_s: list[float]  # seconds of each request, send to full response
    status_codes: list[int]  # HTTP status of each request
    wall_s: float  # from the first request sent to the last response received
    concurrency: int  # requests in flight at once
    responses: list[Any] = field(default_factory=list)  # parsed JSON bodies, in request order

    @property
    def throughput(self) -> float:
        """Requests per second over the whole run."""
        return len(self.latencies_s) / self.wall_s

    @property
    def stats(self) -> LatencyStats:
        return LatencyStats(self.latencies_s)

    @property
    def errors(self) -> int:
        return sum(code >= 400 for code in self.status_codes)


def run_load(
    url: str,
    payloads: Sequence[dict[str, Any]],
    *,
    path: str = "/classify",
    concurrency: int = 8,
    timeout_s: float = 60.0,
) -> LoadResult:
    """Send every payload once, ``concurrency`` at a time, then stop.

    Each of ``concurrency`` threads has its own ``httpx.Client`` (with proxies from the
    environment ignored) and takes the next payload as soon as its previous response is in:
    a closed loop, so exactly ``len(payloads)`` requests are sent.

    Args:
        url: the server's base URL (loopback).
        payloads: the JSON bodies, sent in this order.
        path: the endpoint.
        concurrency: requests in flight at once.
        timeout_s: per-request timeout.

    Returns:
        :class:`LoadResult`, with the responses in the order of ``payloads``.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """
    import httpx

    positive_int(concurrency=concurrency)
    if not payloads:
        raise ValueError("need at least one payload to send")
    n = len(payloads)
    latencies = [0.0] * n
    codes = [0] * n
    bodies: list[Any] = [None] * n
    next_index = iter(range(n))
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=timeout_s, trust_env=False) as client:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                start = time.perf_counter()
                response = client.post(path, json=payloads[i])
                latencies[i] = time.perf_counter() - start
                codes[i] = response.status_code
                bodies[i] = response.json()

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(min(concurrency, n))]:
            future.result()
    wall = time.perf_counter() - start
    return LoadResult(
        latencies_s=latencies,
        status_codes=codes,
        wall_s=wall,
        concurrency=concurrency,
        responses=bodies,
    )
