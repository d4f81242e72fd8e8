"""Small matplotlib helpers shared by the chapters: consistent, laptop-sized figures."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from mmcourse import utils


def setup_notebook(*, dpi: int = 80) -> None:
    """Readable defaults; modest dpi keeps stored notebooks small."""
    plt.rcParams.update(
        {
            "figure.dpi": dpi,
            "savefig.dpi": dpi,
            "figure.figsize": (7, 3.5),
            "axes.titlesize": 10,
            "axes.labelsize": 9,
            "xtick.labelsize": 8,
            "ytick.labelsize": 8,
            "figure.constrained_layout.use": True,
        }
    )


def _to_hwc(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = np.moveaxis(image, 0, -1)  # (C, H, W) -> (H, W, C)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return image


def image_grid(
    images: Sequence,
    titles: Sequence[str] | None = None,
    *,
    ncols: int = 8,
    size: float = 1.4,
    cmap: str = "gray_r",
    suptitle: str | None = None,
) -> plt.Figure:
    """Show images (H, W), (H, W, C) or (C, H, W), arrays or tensors, in a grid with titles."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size * ncols, size * nrows + 0.3 * bool(titles))
    )
    for i, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if i < n:
            image = _to_hwc(images[i])
            ax.imshow(image, cmap=cmap if image.ndim == 2 else None, interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


# Explorers' draw functions: each fills a cleared figure for one setting of its knobs and is
# driven by mmcourse.widgets.explore in its chapter (and tested headless in tests/test_explorers.py).


def draw_shapes_scenes(
    fig: plt.Figure, *, seed: int, num_objects: int, image_size: int = 32, num_scenes: int = 4
) -> None:
    """Shapes-world scenes for one seed and object count, with caption, question and answer.

    Taught in notebooks/00_setup_and_tour.
    """
    import textwrap

    from mmcourse.data import shapes

    config = shapes.ShapesConfig(
        image_size=image_size, min_objects=num_objects, max_objects=num_objects, seed=seed
    )
    scenes = shapes.generate_shapes(num_scenes, split="train", config=config)
    for ax, k in zip(fig.subplots(1, num_scenes), range(num_scenes), strict=True):
        ax.imshow(_to_hwc(scenes["images"][k]), interpolation="nearest")
        ax.axis("off")
        text = (
            f"{scenes['canonical_caption'][k]}\n\u2248 {scenes['caption'][k]}\n"
            f"Q: {scenes['question'][k]}\nA: {scenes['answer'][k]}"
        )
        ax.set_title("\n".join(textwrap.fill(line, 30) for line in text.split("\n")), fontsize=7)
    fig.suptitle(
        f"seed {seed}, {num_objects} object(s) per scene, {image_size} x {image_size} pixels"
    )


def draw_patches_and_mel(
    fig: plt.Figure,
    *,
    image: torch.Tensor,
    patch_size: int,
    wave: torch.Tensor,
    sample_rate: int,
    n_mels: int,
    n_fft: int = 256,
    hop_length: int = 80,
) -> None:
    """An image cut into P x P patches beside a log-mel spectrogram with J mel bands.

    Args:
        image: (C, H, W) in [0, 1]; H and W divisible by ``patch_size``.
        wave: (T,) waveform in [-1, 1] at ``sample_rate`` Hz.

    Taught in notebooks/01_modalities_as_tensors.
    """
    from mmcourse import audio
    from mmcourse.modalities import patchify

    C, H, W = image.shape
    patches = patchify(image[None], patch_size)  # (1, L, P*P*C)
    log_mel = audio.log_mel_spectrogram(
        wave, sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels
    )  # (J, M)
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})
    axes[0].imshow(_to_hwc(image))
    for k in range(1, H // patch_size):
        axes[0].axhline(k * patch_size - 0.5, color="w", lw=0.6)
    for k in range(1, W // patch_size):
        axes[0].axvline(k * patch_size - 0.5, color="w", lw=0.6)
    axes[0].set_title(
        f"P = {patch_size}: L = {patches.shape[1]} tokens of P*P*C = {patches.shape[2]} values"
    )
    axes[0].axis("off")
    seconds = wave.shape[0] / sample_rate
    axes[1].imshow(
        log_mel.numpy(),
        origin="lower",
        aspect="auto",
        cmap="magma",
        extent=[0, seconds, 0, n_mels],
        vmin=float(log_mel.max()) - 80,  # 80 dB: silence (-100 dB) would wash out the rest
    )
    axes[1].set(
        title=f"J = {n_mels} mel bands: {log_mel.shape[1]} frames of {n_mels} values",
        xlabel="time (s)",
        ylabel="mel band",
    )


def draw_attention_map(
    fig: plt.Figure,
    *,
    image: torch.Tensor,
    attentions: torch.Tensor,
    layer: int,
    head: int,
    query: int = 0,
    title: str = "",
) -> None:
    """Where one token attends in one layer and head of a ViT, over the image's patch grid.

    Args:
        image: (C, S, S) the input image.
        attentions: (L, H, T, T) attention weights of this image, token 0 being [CLS] and
            tokens 1..N the patches of a square grid in reading order.
        query: the attending token (0: [CLS]).

    Taught in notebooks/04_transformer_encoders.
    """
    L, H, T, _ = attentions.shape
    if not (0 <= layer < L and 0 <= head < H and 0 <= query < T):
        raise ValueError(f"layer/head/query must be < {L}/{H}/{T}, got {layer}/{head}/{query}")
    grid = int(round((T - 1) ** 0.5))
    weights = attentions[layer, head, query].float()  # (T,)
    size = image.shape[-1]
    axes = fig.subplots(1, 2)
    axes[0].imshow(_to_hwc(image))
    if query > 0:
        row, col = divmod(query - 1, grid)
        step = size / grid
        axes[0].add_patch(
            plt.Rectangle(
                (col * step - 0.5, row * step - 0.5), step, step, fill=False, ec="cyan", lw=1.5
            )
        )
    axes[0].set_title(title or "the image" + (" (cyan: the query patch)" if query else ""))
    im = axes[1].imshow(
        weights[1:].reshape(grid, grid).numpy(),
        cmap="magma",
        vmin=0,
        extent=(-0.5, size - 0.5, size - 0.5, -0.5),
        interpolation="nearest",
    )
    fig.colorbar(im, ax=axes[1], shrink=0.8, label="attention weight")
    who = "[CLS]" if query == 0 else f"patch {query - 1}"
    axes[1].set_title(
        f"block {layer + 1}, head {head}: {who} attends\n({weights[0]:.2f} of it to [CLS] itself)"
    )
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])


def draw_accuracy_bars(
    fig: plt.Figure,
    *,
    accuracies: dict[str, float],
    title: str,
    references: dict[str, float] | None = None,
    spread: dict[str, float] | None = None,
    ylabel: str = "test accuracy",
) -> None:
    """Bars of accuracy per model (with optional spread) and dashed reference lines.

    Taught in notebooks/05_fusion_strategies.
    """
    ax = fig.subplots()
    names = list(accuracies)
    errors = [spread.get(n, 0.0) for n in names] if spread else None
    bars = ax.bar(names, [accuracies[n] for n in names], yerr=errors, capsize=3, color="#55A868")
    for bar, name in zip(bars, names, strict=True):
        ax.text(
            bar.get_x() + bar.get_width() / 2,
            accuracies[name] + 0.01,
            f"{accuracies[name]:.2f}",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    for k, (label, value) in enumerate((references or {}).items()):
        ax.axhline(value, color=f"C{k + 3}", ls="--", lw=1, label=label)
    ax.set(ylim=(0, 1.08), ylabel=ylabel, title=title)
    ax.tick_params(axis="x", rotation=30)
    if references:
        ax.legend(fontsize=7, loc="lower left")


def draw_clip_batch(
    fig: plt.Figure,
    *,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    batch_size: int,
    tau: float,
    learned_tau: float | None = None,
) -> None:
    """A batch's similarity matrix at temperature tau, and the CLIP loss over tau.

    Args:
        image_embeds, text_embeds: (N, E) unit vectors of N matching pairs, N >= batch_size.
        batch_size: B, the first B pairs form the batch.
        tau: the temperature that divides the cosines.
        learned_tau: the model's own temperature, marked on the curve.

    Taught in notebooks/06_contrastive_learning_and_clip.
    """
    from mmcourse.contrastive import clip_loss

    if not 2 <= batch_size <= len(image_embeds):
        raise ValueError(f"batch_size must be in 2..{len(image_embeds)}, got {batch_size}")
    u, v = image_embeds[:batch_size], text_embeds[:batch_size]
    cos = u @ v.T  # (B, B)
    probs = (cos / tau).softmax(dim=1)
    loss = clip_loss(u, v, torch.tensor(1 / tau)).item()
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.3]})
    im = axes[0].imshow(probs.numpy(), cmap="Greens", vmin=0, vmax=1)
    fig.colorbar(im, ax=axes[0], shrink=0.8, label="softmax over the row")
    axes[0].set(
        title=f"B = {batch_size}, $\\tau$ = {tau:.3g}: CLIP loss {loss:.3f}",
        xlabel="caption j",
        ylabel="image i",
    )
    taus = np.geomspace(0.005, 2.0, 60)
    curve = [clip_loss(u, v, torch.tensor(1 / t)).item() for t in taus]
    axes[1].plot(taus, curve, label="CLIP loss of this batch")
    axes[1].axhline(np.log(batch_size), color="gray", ls=":", label="chance, log B")
    axes[1].plot([tau], [loss], "o", color="C3", label=f"$\\tau$ = {tau:.3g}")
    if learned_tau is not None:
        axes[1].axvline(
            learned_tau, color="k", lw=0.8, ls="--", label=f"learned $\\tau$ = {learned_tau:.3g}"
        )
    axes[1].set(
        xscale="log", xlabel="temperature $\\tau$", ylabel="loss (nats)", title="loss over $\\tau$"
    )
    axes[1].legend(fontsize=7)


def draw_retrieval(
    fig: plt.Figure,
    *,
    images: torch.Tensor,
    scores: torch.Tensor,
    query: str,
    k: int = 8,
    labels: Sequence[str] | None = None,
) -> None:
    """The k images that score highest for a text query, with their scores.

    Args:
        images: (N, C, H, W); scores: (N,) one similarity per image.

    Taught in notebooks/06_contrastive_learning_and_clip.
    """
    top = scores.topk(min(k, len(scores))).indices
    axes = np.atleast_1d(fig.subplots(1, len(top)))
    for ax, i in zip(axes, top.tolist(), strict=True):
        ax.imshow(_to_hwc(images[i]), interpolation="nearest")
        ax.set_title(
            f"{scores[i]:.2f}" + (f"\n{labels[i]}" if labels is not None else ""), fontsize=7
        )
        ax.axis("off")
    fig.suptitle(f'the {len(top)} images closest to "{query}" (cosine similarity)')


def draw_word_attention(
    fig: plt.Figure,
    *,
    image: torch.Tensor,
    words: Sequence[str],
    weights: torch.Tensor,
    grid: int,
    title: str = "",
    max_words: int = 12,
) -> None:
    """An image, then one copy per generated word with that word's attention over the patches.

    Args:
        image: (3, H, W) image in [0, 1].
        words: the generated words, in order.
        weights: (T, grid * grid) attention of each word over the image patches, T >= shown words.
        grid: patches per side.
        title: the figure's title.
        max_words: at most this many words are drawn.

    Taught in notebooks/10_captioning_and_vqa.
    """
    n = min(len(words), max_words)
    if weights.dim() != 2 or weights.shape[0] < n or weights.shape[1] != grid * grid:
        raise ValueError(
            f"weights must be (T >= {n}, grid * grid = {grid * grid}), got {tuple(weights.shape)}"
        )
    picture = _to_hwc(image)
    height, width = picture.shape[:2]
    axes = np.atleast_1d(fig.subplots(1, n + 1))
    axes[0].imshow(picture)
    axes[0].set_title("image", fontsize=8)
    for ax, t in zip(axes[1:], range(n), strict=True):
        heat = weights[t].view(grid, grid).float().numpy()
        ax.imshow(picture)
        ax.imshow(
            heat,
            cmap="magma",
            alpha=0.6,
            extent=(0, width, height, 0),
            vmin=0,
            vmax=max(1e-6, heat.max()),
        )
        ax.set_title(f'"{words[t]}"', fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)


def draw_hard_negatives(
    fig: plt.Figure,
    *,
    similarity: torch.Tensor,
    own: torch.Tensor,
    differing: torch.Tensor,
    temperature: float,
    hard: bool = True,
    pool: torch.Tensor | None = None,
    example_captions: Sequence[str] | None = None,
    example: int = 0,
) -> None:
    """What ITM's negative sampler draws: how many attributes a negative caption changes.

    Args:
        similarity: (N, C) ITC logits of N images against the C pool captions.
        own: (N,) the pool index of each image's true caption (never drawn).
        differing: (N, C) how many attributes each pool caption changes for each image.
        temperature: T of softmax(similarity / T); ``hard=False`` samples uniformly.
        pool: (N, C) bool, the captions each image may draw from (None: all of them).
        example_captions: the C captions, to list the example image's likeliest negatives.

    Taught in notebooks/07_pretraining_objectives.
    """
    from mmcourse.pretraining import bank_negative_weights

    p = bank_negative_weights(similarity, own, hard=hard, temperature=temperature)  # (N, C)
    if pool is not None:
        p = p * pool
    p = p / p.sum(1, keepdim=True).clamp_min(1e-30)  # uniform weights and pools are unnormalised
    counts = int(differing.max())
    expected = [(p * (differing == d)).sum(1).mean().item() for d in range(1, counts + 1)]
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.5]})
    axes[0].bar(range(1, counts + 1), expected, color="#c63")
    kind = f"hard, T = {temperature:.3g}" if hard else "random"
    if pool is not None:
        kind += f", pool of {int(pool[example].sum())}"
    axes[0].set(
        ylim=(0, 1),
        xlabel="attributes the negative changes",
        ylabel="share of negatives",
        title=f"{kind}: expected over {len(p)} images",
        xticks=range(1, counts + 1),
    )
    row = p[example]
    top = row.topk(min(8, int((row > 0).sum()))).indices.tolist()
    axes[1].barh(range(len(top))[::-1], [row[j].item() for j in top], color="#e9a")
    names = example_captions or [f"caption {j}" for j in range(p.shape[1])]
    axes[1].set_yticks(
        range(len(top))[::-1],
        [f"{names[j]} ({int(differing[example, j])})" for j in top],
        fontsize=7,
    )
    true = f'true: "{names[int(own[example])]}"' if example_captions else ""
    axes[1].set(xlabel="p(negative)", title=f"image {example}'s likeliest negatives {true}")


def draw_masking_curve(
    fig: plt.Figure,
    *,
    rates: Sequence[float],
    accuracies: dict[str, Sequence[float]],
    rate: float,
    trained_at: float | None = None,
    example: Sequence[tuple[str, str]] = (),
) -> None:
    """MLM accuracy of each model over the masking rate, and one caption masked at ``rate``.

    Args:
        rates: the masking rates measured; accuracies: {model: accuracy at each rate}.
        example: (label, text) lines, e.g. the true, the masked and the filled caption.

    Taught in notebooks/07_pretraining_objectives.
    """
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
    for name, values in accuracies.items():
        axes[0].plot(rates, values, "o-", label=name)
    axes[0].axvline(rate, color="C3", lw=1, label=f"p = {rate:g}")
    if trained_at is not None:
        axes[0].axvline(
            trained_at, color="gray", ls=":", lw=1, label=f"trained at p = {trained_at:g}"
        )
    axes[0].set(
        ylim=(0, 1.02),
        xlabel="masking rate p",
        ylabel="accuracy on masked words",
        title="fill the masked words of test captions",
    )
    axes[0].legend(fontsize=7)
    axes[1].axis("off")
    for k, (label, text) in enumerate(example):
        axes[1].text(
            0, 0.8 - 0.25 * k, f"{label}:", fontsize=8, weight="bold", transform=axes[1].transAxes
        )
        axes[1].text(0, 0.7 - 0.25 * k, text, fontsize=8, transform=axes[1].transAxes, wrap=True)
    axes[1].set_title(f"one test caption at p = {rate:g}")


def draw_trainable_parameters(
    fig: plt.Figure,
    *,
    counts: dict[str, int],
    measured: dict[str, tuple[int, float]] | None = None,
    highlight: str | None = None,
) -> None:
    """Trainable parameters per strategy (log bars), beside measured (trainable, accuracy) points.

    Args:
        counts: {strategy: trainable numbers} to draw as bars.
        measured: {run: (trainable numbers, test accuracy)} of runs actually trained.
        highlight: the bar (and vertical line on the right) of the setting being explored.

    Taught in notebooks/08_fine_tuning.
    """
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.3, 1]})
    names = list(counts)
    colours = ["C3" if n == highlight else "0.6" for n in names]
    axes[0].barh(names[::-1], [counts[n] for n in names][::-1], color=colours[::-1])
    for k, n in enumerate(names[::-1]):
        axes[0].text(counts[n], k, f" {counts[n]:,}", va="center", fontsize=7)
    axes[0].set(xscale="log", xlabel="trainable numbers (log)", title="what trains")
    axes[0].tick_params(axis="y", labelsize=7)
    if measured:
        for k, (name, (numbers, acc)) in enumerate(measured.items()):
            axes[1].scatter(numbers, acc, color=f"C{k}", label=f"{name}: {acc:.3f}")
        if highlight is not None:
            axes[1].axvline(
                counts[highlight], color="C3", lw=1, ls="--", label="this setting (not trained)"
            )
        axes[1].set(
            xscale="log",
            xlabel="trainable numbers (log)",
            ylabel="test accuracy",
            title="measured runs",
        )
        axes[1].legend(fontsize=6)
    else:
        axes[1].axis("off")


def draw_soft_labels(
    fig: plt.Figure,
    *,
    logits: torch.Tensor,
    true: int,
    names: Sequence[str],
    temperature: float,
    measured: dict[float, float] | None = None,
    caption: str = "",
) -> None:
    """One caption's teacher distribution p^T, and the student accuracy measured at some T.

    Args:
        logits: (K,) the teacher's logits for one example; true: its class.
        measured: {T: student test accuracy} from the chapter's sweep (only these T trained).

    Taught in notebooks/09_knowledge_distillation.
    """
    p = (logits.float() / temperature).softmax(-1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum().item()
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    bars = axes[0].bar(range(len(p)), p.numpy(), color="lightgray")
    bars[int(p.argmax())].set_color("tab:orange")
    bars[true].set_color("tab:red")
    axes[0].set_xticks(range(len(p)), names, rotation=90, fontsize=6)
    axes[0].set(
        ylim=(0, 1),
        ylabel="$p_k^T$",
        title=f'T = {temperature:.3g}: p(true) = {p[true]:.2f}, entropy {entropy:.2f} nats\n"{caption}"',
    )
    if measured:
        ts = sorted(measured)
        axes[1].plot(ts, [measured[t] for t in ts], "o-", label="student (measured)")
        axes[1].axvline(temperature, color="C3", lw=1, label="this T")
        axes[1].set(
            xscale="log",
            xlabel="T",
            ylabel="student test accuracy",
            title="trained only at these T",
        )
        axes[1].legend(fontsize=7)
    else:
        axes[1].axis("off")


def draw_logits_memory(
    fig: plt.Figure,
    *,
    global_batch: int,
    world_size: int,
    bytes_per_element: int = 4,
    embed_dim: int = 768,
    device_gib: float | None = None,
) -> None:
    """Per-process memory of CLIP's similarity matrix: G x G when every process builds it
    whole, B x G with ``local_loss`` (B = G / W), and the gathered embeddings.

    Taught in notebooks/15_scaling_out.
    """
    if global_batch % world_size:
        raise ValueError(
            f"global_batch {global_batch} must be divisible by world_size {world_size}"
        )
    local = global_batch // world_size
    gib = 2**30
    items = {
        "G x G logits": global_batch * global_batch * bytes_per_element / gib,
        "B x G logits\n(local_loss)": local * global_batch * bytes_per_element / gib,
        "gathered U, V": 2 * global_batch * embed_dim * bytes_per_element / gib,
    }
    ax = fig.subplots()
    bars = ax.bar(list(items), list(items.values()), color=["C3", "C0", "C2"])
    for bar, value in zip(bars, items.values(), strict=True):
        ax.text(
            bar.get_x() + bar.get_width() / 2,
            value,
            f"{value:,.3g} GiB",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    if device_gib:
        ax.axhline(device_gib, color="k", ls="--", lw=1, label=f"one GPU: {device_gib:.1f} GiB")
        ax.legend(fontsize=8)
    ax.set(
        yscale="log",
        ylabel="per process (GiB, log)",
        title=f"G = {global_batch:,} pairs on W = {world_size} processes (B = {local:,} each), "
        f"{bytes_per_element} bytes per number",
    )


# --- chapter 05: the fusion strategies as boxes and arrows ---------------------------------

_COLOURS = {"image": "#dbe6f4", "audio": "#fbe3d2", "fused": "#dcefdc", "head": "#e6e0f3"}

# per strategy: boxes {name: (x, y, text, colour)} and arrows [(from, to)]
_ENCODERS = {
    "img": (0.9, 3.0, "image\n8x8 pixels", "image"),
    "aud": (0.9, 1.0, "audio\nlog-mel", "audio"),
    "enc1": (2.8, 3.0, "encoder\n$X_1$: 16 tokens", "image"),
    "enc2": (2.8, 1.0, "encoder\n$X_2$: 26 tokens", "audio"),
}
_DIAGRAMS: dict[str, tuple[dict, list]] = {
    "early": (
        {
            "p1": (4.8, 3.0, "pool\n$h_1$", "image"),
            "p2": (4.8, 1.0, "pool\n$h_2$", "audio"),
            "cat": (6.6, 2.0, "concatenate\n$z = [h_1; h_2]$", "fused"),
            "mlp": (8.4, 2.0, "joint MLP", "head"),
            "out": (9.9, 2.0, "$\\hat y$", "head"),
        },
        [
            ("enc1", "p1"),
            ("enc2", "p2"),
            ("p1", "cat"),
            ("p2", "cat"),
            ("cat", "mlp"),
            ("mlp", "out"),
        ],
    ),
    "early_tokens": (
        {
            "cat": (5.0, 2.0, "one sequence\n$[X_1{+}e_1;\\ X_2{+}e_2]$", "fused"),
            "sa": (7.0, 2.0, "self-attention\nover all 42 tokens", "fused"),
            "mlp": (8.7, 2.0, "pool, MLP", "head"),
            "out": (10.0, 2.0, "$\\hat y$", "head"),
        },
        [("enc1", "cat"), ("enc2", "cat"), ("cat", "sa"), ("sa", "mlp"), ("mlp", "out")],
    ),
    "late": (
        {
            "h1": (5.0, 3.0, "pool, head$_1$\n$\\ell_1$ (C logits)", "image"),
            "h2": (5.0, 1.0, "pool, head$_2$\n$\\ell_2$ (C logits)", "audio"),
            "sum": (7.4, 2.0, "$\\ell = \\sum_m w_m \\ell_m$\naverage or learned $w$", "fused"),
            "out": (9.4, 2.0, "$\\hat y$", "head"),
        },
        [("enc1", "h1"), ("enc2", "h2"), ("h1", "sum"), ("h2", "sum"), ("sum", "out")],
    ),
    "cross_attention": (
        {
            "a1": (5.2, 3.0, "image attends to audio\nQ=$X_1$, K=V=$X_2$", "image"),
            "a2": (5.2, 1.0, "audio attends to image\nQ=$X_2$, K=V=$X_1$", "audio"),
            "mlp": (7.7, 2.0, "pool both,\nconcatenate, MLP", "head"),
            "out": (9.5, 2.0, "$\\hat y$", "head"),
        },
        [
            ("enc1", "a1"),
            ("enc2", "a2"),
            ("enc1", "a2"),
            ("enc2", "a1"),
            ("a1", "mlp"),
            ("a2", "mlp"),
            ("mlp", "out"),
        ],
    ),
    "gated": (
        {
            "t1": (5.0, 3.3, "pool $h_1$, $\\tilde h_1 = \\tanh(W_1 h_1)$", "image"),
            "t2": (5.0, 0.7, "pool $h_2$, $\\tilde h_2 = \\tanh(W_2 h_2)$", "audio"),
            "z": (5.0, 2.0, "gates $z = $ softmax$_m(W_z [h_1; h_2])$", "fused"),
            "mix": (7.6, 2.0, "$h = z_1 \\odot \\tilde h_1 + z_2 \\odot \\tilde h_2$", "fused"),
            "mlp": (9.3, 2.0, "MLP", "head"),
            "out": (10.3, 2.0, "$\\hat y$", "head"),
        },
        [
            ("enc1", "t1"),
            ("enc2", "t2"),
            ("enc1", "z"),
            ("enc2", "z"),
            ("t1", "mix"),
            ("t2", "mix"),
            ("z", "mix"),
            ("mix", "mlp"),
            ("mlp", "out"),
        ],
    ),
    "film": (
        {
            "gb": (5.0, 3.0, "pool, linear\n$\\gamma, \\beta$ from the image", "image"),
            "film": (5.0, 1.0, "FiLM on audio tokens\n$(1+\\gamma) \\odot X_2 + \\beta$", "fused"),
            "mlp": (7.6, 1.0, "pool, MLP", "head"),
            "out": (9.2, 1.0, "$\\hat y$", "head"),
        },
        [("enc1", "gb"), ("enc2", "film"), ("gb", "film"), ("film", "mlp"), ("mlp", "out")],
    ),
    "tensor": (
        {
            "p1": (4.8, 3.0, "pool to $d$\n$[h_1; 1]$", "image"),
            "p2": (4.8, 1.0, "pool to $d$\n$[h_2; 1]$", "audio"),
            "op": (
                6.8,
                2.0,
                "outer product\n$[h_1;1] \\otimes [h_2;1]$\n$(d{+}1)^2$ values",
                "fused",
            ),
            "mlp": (8.6, 2.0, "MLP", "head"),
            "out": (9.8, 2.0, "$\\hat y$", "head"),
        },
        [("enc1", "p1"), ("enc2", "p2"), ("p1", "op"), ("p2", "op"), ("op", "mlp"), ("mlp", "out")],
    ),
}


def draw_fusion_diagram(strategy: str, ax=None):
    """A boxes-and-arrows schematic of one strategy, image on top and audio below.

    Args:
        strategy: ``"early"``, ``"early_tokens"``, ``"late"``, ``"cross_attention"``,
            ``"gated"``, ``"film"`` (the image modulating the audio) or ``"tensor"``.
        ax: a matplotlib axes to draw into; None makes a new figure.

    Returns:
        The matplotlib figure.

    Taught in notebooks/05_fusion_strategies.
    """
    utils.one_of("strategy", strategy, tuple(_DIAGRAMS))
    boxes, arrows = _DIAGRAMS[strategy]
    boxes = {**_ENCODERS, **boxes}
    arrows = [("img", "enc1"), ("aud", "enc2"), *arrows]
    if ax is None:
        fig, ax = plt.subplots(figsize=(10, 2.5))
    fig = ax.figure
    ax.set_xlim(0, 11)
    ax.set_ylim(0.2, 3.8)
    ax.axis("off")
    patches = {}
    for name, (x, y, text, colour) in boxes.items():
        patches[name] = ax.text(
            x,
            y,
            text,
            ha="center",
            va="center",
            fontsize=8.5,
            bbox=dict(boxstyle="round,pad=0.35", fc=_COLOURS[colour], ec="0.4", lw=0.8),
        )
    for a, b in arrows:
        ax.annotate(
            "",
            xy=(0.5, 0.5),
            xytext=(0.5, 0.5),
            xycoords=patches[b],
            textcoords=patches[a],
            arrowprops=dict(
                arrowstyle="->",
                color="0.3",
                lw=1.0,
                shrinkA=2,
                shrinkB=2,
                patchA=patches[a].get_bbox_patch(),
                patchB=patches[b].get_bbox_patch(),
            ),
        )
    return fig
