"""The CLIP service: bundle round trip, endpoints in-process and over a real socket on
127.0.0.1, bad requests answered with a 4xx while the server keeps serving, dynamic batching
giving the same answers as unbatched, and a bounded load; the same for chapter 10's
captioner behind ``POST /caption``."""

import asyncio
import socket

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from mmcourse import serve
from mmcourse.captioning import Captioner, CaptionerConfig, generate_text
from mmcourse.clip import TinyClip, TinyClipConfig, WordTokenizer
from mmcourse.generation import GenerationConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTIONS = ["a red circle", "a blue square", "a green triangle on the left", "a big star"]
LABELS = ["red circle", "blue square", "green triangle"]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = WordTokenizer.from_texts(CAPTIONS)
    model = TinyClip(
        TinyClipConfig(
            vocab_size=len(tokenizer),
            embed_dim=16,
            vision_dim=16,
            text_dim=16,
            vision_layers=1,
            text_layers=1,
            vision_heads=2,
            text_heads=2,
        )
    ).eval()
    gallery = torch.randn(6, 16)
    folder = tmp_path_factory.mktemp("bundle")
    serve.save_clip_bundle(
        folder,
        model,
        tokenizer,
        gallery_embeds=gallery,
        gallery_captions=[f"c{i}" for i in range(6)],
    )
    return folder


def _image(seed: int, shape=(3, 32, 32)) -> list:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)).tolist()


def _bad_requests(post):
    """Send the bad requests; return their responses."""
    return [
        post("/classify", json={"image": _image(0, (32, 32, 3)), "labels": LABELS}),
        post("/classify", json={"image": _image(0), "labels": []}),
        post(
            "/classify", content=b"this is not json", headers={"Content-Type": "application/json"}
        ),
        post("/classify", json={"image": _image(0)}),
        post("/classify", json={"image": [[1, 2], [3]], "labels": LABELS}),
        post("/classify", json={"image": _image(0), "labels": LABELS, "templates": ["no slot"]}),
        post("/retrieve", json={"text": "a red circle", "k": 0}),
    ]


def _check_bad_responses(responses):
    codes = [r.status_code for r in responses]
    assert all(400 <= c < 500 for c in codes), codes
    details = [r.json()["detail"] for r in responses]
    assert "expected an image of shape (3, 32, 32)" in details[0] and "(32, 32, 3)" in details[0]
    assert "labels must be a non-empty list" in details[1]
    assert codes[2] == 400 and "not valid JSON" in details[2]
    assert "labels: Field required" in details[3]
    assert "nested list of numbers of shape (3, 32, 32)" in details[4]
    assert "one '{}'" in details[5]
    assert "k must be in [1, 6]" in details[6]


def test_bundle_round_trip(bundle_dir, tmp_path):
    bundle = serve.load_clip_bundle(bundle_dir)
    tokenizer = WordTokenizer.from_texts(CAPTIONS)
    assert bundle.tokenizer.id_to_token == tokenizer.id_to_token
    assert bundle.gallery_embeds.shape == (6, 16) and bundle.gallery_captions[0] == "c0"
    torch.testing.assert_close(bundle.gallery_embeds.norm(dim=-1), torch.ones(6))
    copy_dir = serve.save_clip_bundle(tmp_path / "copy", bundle.model, bundle.tokenizer)
    again = serve.load_clip_bundle(copy_dir)
    for (name, a), (_, b) in zip(
        bundle.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert again.gallery_embeds is None
    with pytest.raises(FileExistsError, match="already holds a bundle"):
        serve.save_clip_bundle(copy_dir, bundle.model, bundle.tokenizer)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        serve.load_clip_bundle(tmp_path)


def test_in_process_endpoints_and_bad_requests(bundle_dir):
    app = serve.create_app(bundle_dir, serve.ServeConfig(dynamic_batching=True))
    with TestClient(app) as client:
        assert client.get("/health").json()["status"] == "ok"
        good = client.post("/classify", json={"image": _image(1), "labels": LABELS})
        assert good.status_code == 200
        body = good.json()
        assert body["label"] in LABELS and set(body["scores"]) == set(LABELS)
        assert body["label"] == max(body["scores"], key=body["scores"].get)
        _check_bad_responses(_bad_requests(client.post))
        again = client.post("/classify", json={"image": _image(1), "labels": LABELS})
        assert again.status_code == 200 and again.json() == body  # still serving, same answer
        found = client.post("/retrieve", json={"text": "a red circle", "k": 3}).json()["results"]
        scores = [r["score"] for r in found]
        assert len(found) == 3 and scores == sorted(scores, reverse=True)


def test_scores_equal_the_model_directly(bundle_dir):
    from mmcourse.clip import zero_shot_scores

    bundle = serve.load_clip_bundle(bundle_dir)
    image = torch.tensor(_image(2))
    with torch.no_grad():
        u = bundle.model.encode_image(image[None])
        p = bundle.model.encode_text(bundle.tokenizer([f"a {label}" for label in LABELS]))
    expected = zero_shot_scores(u, p[:, None])[0]
    with TestClient(serve.create_app(bundle)) as client:
        got = client.post("/classify", json={"image": image.tolist(), "labels": LABELS}).json()
    torch.testing.assert_close(
        torch.tensor([got["scores"][label] for label in LABELS]), expected, atol=1e-5, rtol=0
    )


@pytest.mark.slow
def test_real_socket_batching_same_answers_and_bad_requests(bundle_dir):
    payloads = [{"image": _image(i), "labels": LABELS} for i in range(12)]
    results = {}
    for batching in (True, False):
        config = serve.ServeConfig(dynamic_batching=batching, batch_window_ms=50.0)
        app = serve.create_app(bundle_dir, config)
        with serve.serving(app) as url:
            assert url.startswith("http://127.0.0.1:")
            load = serve.run_load(url, payloads, concurrency=6)
            assert load.status_codes == [200] * 12 and load.errors == 0
            assert len(load.latencies_s) == 12 and load.throughput > 0
            with httpx.Client(base_url=url, trust_env=False) as client:
                _check_bad_responses(_bad_requests(client.post))
                assert client.get("/health").status_code == 200  # still serving
        sizes = app.state.batchers["images"].batch_sizes
        assert max(sizes) > 1 if batching else set(sizes) == {1}
        results[batching] = load.responses
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            pass  # stopped: nothing listens any more
    for batched, alone in zip(results[True], results[False], strict=True):
        assert batched["label"] == alone["label"]
        for label in LABELS:
            assert abs(batched["scores"][label] - alone["scores"][label]) < 1e-5


def test_server_refuses_other_interfaces_and_always_stops(bundle_dir):
    app = serve.create_app(bundle_dir)
    with pytest.raises(ValueError, match="loopback"):
        serve.start_server(app, host="0.0.0.0")
    with pytest.raises(RuntimeError, match="boom"), serve.serving(app) as url:
        port = int(url.rsplit(":", 1)[1])
        raise RuntimeError("boom")
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_dynamic_batcher_groups_and_propagates_errors():
    calls = []

    def double(items):
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("bad item")
        return [2 * x for x in items]

    async def main():
        batcher = serve.DynamicBatcher(double, max_batch_size=4, window_s=0.05)
        out = await asyncio.gather(*(batcher.submit(i) for i in range(6)))
        with pytest.raises(ValueError, match="bad item"):
            await asyncio.gather(batcher.submit("bad"), batcher.submit(1))
        await batcher.aclose()
        alone = serve.DynamicBatcher(double, enabled=False)
        single = await asyncio.gather(*(alone.submit(i) for i in range(3)))
        assert batcher.busy_s > 0 and alone.busy_s > 0  # time inside fn is counted
        return out, batcher.batch_sizes, single, alone.batch_sizes

    out, sizes, single, single_sizes = asyncio.run(main())
    assert out == [0, 2, 4, 6, 8, 10] and sizes[:2] == [4, 2]
    assert single == [0, 2, 4] and single_sizes == [1, 1, 1]
    assert calls[0] == [0, 1, 2, 3] and calls[1] == [4, 5]


def test_bad_inputs_at_the_boundaries():
    with pytest.raises(ValueError, match="max_batch_size"):
        serve.ServeConfig(max_batch_size=0)
    with pytest.raises(serve.BadRequest, match="values must be finite numbers in"):
        serve.parse_image((2 * torch.ones(3, 4, 4)).tolist(), 4)
    with pytest.raises(ValueError, match="at least one payload"):
        serve.run_load("http://127.0.0.1:1", [])


# --- the captioner behind POST /caption ---------------------------------------------------


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = WordTokenizer.from_texts(CAPTIONS)
    config = CaptionerConfig(
        vocab_size=tokenizer.vocab_size,
        dim=16,
        num_heads=2,
        encoder_layers=1,
        decoder_layers=1,
        max_length=12,
    )
    folder = tmp_path_factory.mktemp("captioner")
    return serve.save_captioner_bundle(folder, Captioner(config).eval(), tokenizer)


def _direct_caption(bundle, image, limit):
    """What the captioner writes alone, greedy, at most ``limit`` tokens, cut at [SEP]."""
    _, out = generate_text(
        bundle.model,
        bundle.tokenizer,
        images=torch.tensor(image)[None],
        config=GenerationConfig(max_new_tokens=limit),
    )
    row = out.generated[0].tolist()
    eos = bundle.model.config.eos_token_id
    stopped = eos in row
    row = row[: row.index(eos)] if stopped else row
    return {"caption": bundle.tokenizer.decode(row), "num_tokens": len(row), "stopped": stopped}


def _bad_caption_requests(post):
    good = {"image": _image(0), "max_new_tokens": 5}
    return [
        post("/caption", json=dict(good, image=_image(0, (3, 16, 16)))),
        post("/caption", content=b"{image: [", headers={"Content-Type": "application/json"}),
        post("/caption", json=dict(good, max_new_tokens=0)),
        post("/caption", json=dict(good, max_new_tokens=12)),
        post("/caption", json=dict(good, max_new_tokens="long")),
        post("/caption", json={"max_new_tokens": 5}),
    ]


def _check_bad_caption_responses(responses):
    codes = [r.status_code for r in responses]
    assert all(400 <= c < 500 for c in codes), codes
    details = [r.json()["detail"] for r in responses]
    assert "expected an image of shape (3, 32, 32)" in details[0] and "(3, 16, 16)" in details[0]
    assert codes[1] == 400 and "not valid JSON" in details[1]
    assert "max_new_tokens must be an integer in [1, 11]" in details[2] and "got 0" in details[2]
    assert "max_new_tokens must be an integer in [1, 11]" in details[3] and "got 12" in details[3]
    assert details[4].startswith("max_new_tokens:") and "integer" in details[4]
    assert "image: Field required" in details[5]


def test_captioner_bundle_round_trip(captioner_dir, tmp_path):
    bundle = serve.load_captioner_bundle(captioner_dir)
    assert bundle.tokenizer.id_to_token == WordTokenizer.from_texts(CAPTIONS).id_to_token
    copy_dir = serve.save_captioner_bundle(tmp_path, bundle.model, bundle.tokenizer)
    again = serve.load_captioner_bundle(copy_dir)
    assert again.model.config == bundle.model.config
    for (name, a), (_, b) in zip(
        bundle.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    with pytest.raises(FileExistsError, match="already holds a captioner"):
        serve.save_captioner_bundle(copy_dir, bundle.model, bundle.tokenizer)
    with pytest.raises(FileNotFoundError, match="no captioner.safetensors"):
        serve.load_captioner_bundle(tmp_path / "empty")
    with pytest.raises(ValueError, match="not the tokenizer it was trained with"):
        serve.save_captioner_bundle(tmp_path / "x", bundle.model, WordTokenizer(["one"]))
    with pytest.raises(ValueError, match="expected a Captioner"):
        serve.save_captioner_bundle(tmp_path / "x", bundle.tokenizer, bundle.tokenizer)


def test_caption_endpoint_in_process(bundle_dir, captioner_dir):
    bundle = serve.load_captioner_bundle(captioner_dir)
    app = serve.create_app(bundle_dir, captioner=captioner_dir)
    with TestClient(app) as client:
        assert client.get("/health").json()["captioning"] is True
        for seed, limit in [(1, 11), (2, 3), (3, 1)]:
            got = client.post("/caption", json={"image": _image(seed), "max_new_tokens": limit})
            assert got.status_code == 200
            assert got.json() == _direct_caption(bundle, _image(seed), limit)
            assert got.json()["num_tokens"] <= limit
        default = client.post("/caption", json={"image": _image(1)})  # max_new_tokens: 20
        assert default.status_code == 422 and "got 20" in default.json()["detail"]
        _check_bad_caption_responses(_bad_caption_requests(client.post))
        again = client.post("/caption", json={"image": _image(1), "max_new_tokens": 11})
        assert again.status_code == 200  # still serving
    # a captioner that writes [SEP] at once: an empty caption that stopped
    eager = serve.load_captioner_bundle(captioner_dir)
    with torch.no_grad():
        eager.model.lm_head.bias[eager.model.config.eos_token_id] = 100.0
    with TestClient(serve.create_app(bundle_dir, captioner=eager)) as client:
        body = client.post("/caption", json={"image": _image(1), "max_new_tokens": 4}).json()
    assert body == {"caption": "", "num_tokens": 0, "stopped": True}
    with TestClient(serve.create_app(bundle_dir)) as client:  # no captioner
        missing = client.post("/caption", json={"image": _image(1), "max_new_tokens": 4})
        assert client.get("/health").json()["captioning"] is False
    assert missing.status_code == 404 and "no captioner" in missing.json()["detail"]


@pytest.mark.slow
def test_caption_real_socket_batched_equals_alone(bundle_dir, captioner_dir):
    bundle = serve.load_captioner_bundle(captioner_dir)
    limits = [11, 2, 5, 1, 8, 3, 11, 4]
    payloads = [{"image": _image(i), "max_new_tokens": n} for i, n in enumerate(limits)]
    expected = [_direct_caption(bundle, p["image"], p["max_new_tokens"]) for p in payloads]
    config = serve.ServeConfig(dynamic_batching=True, batch_window_ms=50.0)
    app = serve.create_app(bundle_dir, config, captioner=captioner_dir)
    with serve.serving(app) as url:
        load = serve.run_load(url, payloads, path="/caption", concurrency=4)
        with httpx.Client(base_url=url, trust_env=False) as client:
            _check_bad_caption_responses(_bad_caption_requests(client.post))
            assert client.post("/caption", json=payloads[0]).json() == expected[0]
    assert load.errors == 0 and load.responses == expected
    assert max(app.state.batchers["captions"].batch_sizes) > 1  # batched, same answers
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass  # stopped
