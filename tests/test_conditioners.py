"""Conditioners: class-label embeddings, MiniLM sentence vectors, the OpenCLIP text tower."""

from __future__ import annotations

import json

import pytest
import torch

from n2a_core import BuildContext, get_registry
from n2a_core.errors import N2AError, SpecError
from n2a_plugins.conditioners import ClassLabelConditioner, ClipConditioner, MiniLMConditioner


def build(spec: dict, **ctx):
    registry = get_registry()
    return registry.build("conditioner", registry.validate_spec("conditioner", spec), BuildContext(**ctx))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """Whatever this machine has cached, these tests see an empty Hugging Face cache."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


# -- class-label ----------------------------------------------------------------------------
VOCAB = ["cat", "dog", "fish"]


def test_class_label_looks_up_its_rows_and_trains():
    cond = build({"type": "class-label", "dim": 8}, label_vocabulary=VOCAB)
    assert isinstance(cond, ClassLabelConditioner) and cond.labels == VOCAB and cond.dim == 8
    assert cond.field == "label" and cond.output == "vector" and cond.trainable
    out = cond.embed(["dog", "cat", "dog"])
    torch.testing.assert_close(out, cond.embedding.weight[[1, 0, 1]])
    out.sum().backward()
    used = cond.embedding.weight.grad.abs().sum(dim=1) > 0
    assert used.tolist() == [True, True, False]  # only the looked-up rows learn
    assert list(cond.state_dict()) == ["embedding.weight"]
    torch.testing.assert_close(cond.null_embedding(2), torch.zeros(2, 8))


def test_unknown_label_lists_the_known_ones():
    cond = build({"type": "class-label"}, label_vocabulary=VOCAB)
    expected = r"unknown label 'dgo' \(did you mean 'dog'\?\).*the 3 known labels are: cat, dog, fish"
    with pytest.raises(SpecError, match=expected):
        cond.embed(["cat", "dgo"])
    many = build({"type": "class-label"}, label_vocabulary=[f"class{i:03d}" for i in range(100)])
    with pytest.raises(SpecError) as info:
        many.embed(["nope"])
    message = str(info.value)
    assert "\n" not in message and "class019" in message and "class020" not in message and "(80 more)" in message


def test_class_label_without_labels_says_where_they_come_from():
    with pytest.raises(SpecError, match="needs class labels but the data has none.*caption conditioner"):
        build({"type": "class-label"})


def test_vocabulary_round_trips_through_the_spec():
    trained = build({"type": "class-label", "dim": 4}, label_vocabulary=VOCAB)
    saved_spec = {"type": "class-label", "dim": 4, "labels": trained.labels}
    restored = build(saved_spec)  # no data at sampling time
    restored.load_state_dict(trained.state_dict())
    torch.testing.assert_close(restored.embed(["fish", "cat"]), trained.embed(["fish", "cat"]))
    with pytest.raises(SpecError, match="differ from the data's 4.*also has bird"):
        build(saved_spec, label_vocabulary=sorted([*VOCAB, "bird"]))
    with pytest.raises(N2AError, match="conditioner.labels.*'cat' more than once"):
        get_registry().validate_spec("conditioner", {"type": "class-label", "labels": ["cat", "cat"]})


# -- MiniLM ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    return build({"type": "minilm"})


def test_minilm_is_lazy_frozen_and_384_wide(minilm):
    assert isinstance(minilm, MiniLMConditioner) and minilm._model is None  # nothing loaded yet
    assert minilm.dim == 384 and minilm.field == "caption" and minilm.output == "vector"
    torch.testing.assert_close(minilm.null_embedding(3), torch.zeros(3, 384))
    minilm.embed(["a tree"])
    assert minilm._model is not None
    assert list(minilm.parameters()) == [] and minilm.state_dict() == {} and not minilm.trainable


def test_minilm_similar_captions_are_closer(minilm):
    red, green, an, rocket = minilm.embed(["red apple", "green apple", "an apple", "rocket ship"])
    assert minilm.embed(["red apple"]).shape == (1, 384)
    torch.testing.assert_close(torch.stack([red, rocket]).norm(dim=1), torch.ones(2))  # normalised
    assert cosine(red, green) > cosine(red, rocket) + 0.2
    assert cosine(red, an) > cosine(red, rocket) + 0.2


def test_minilm_cache_runs_the_model_once_per_caption(minilm, monkeypatch):
    calls = []
    encode = minilm._encode
    monkeypatch.setattr(minilm, "_encode", lambda model, texts: calls.append(list(texts)) or encode(model, texts))
    minilm._cache.clear()
    first = minilm.embed(["a cat", "a dog", "a cat"])
    again = minilm.embed(["a dog", "a cat"])
    mixed = minilm.embed(["a bird", "a cat"])
    assert calls == [["a cat", "a dog"], ["a bird"]]
    torch.testing.assert_close(first[0], first[2])
    torch.testing.assert_close(again, first[[1, 0]])
    torch.testing.assert_close(mixed[1], first[0])
    monkeypatch.setattr(minilm, "cache_size", 2)  # LRU: 'a dog' is the oldest now
    minilm.embed(["a fish"])
    assert list(minilm._cache) == ["a cat", "a fish"]


def test_minilm_embeddings_can_feed_a_trained_layer(minilm):
    """sentence-transformers encodes under inference_mode; such tensors would break backward."""
    layer = torch.nn.Linear(384, 2)
    layer(minilm.embed(["a red apple", "a boat"])).sum().backward()
    assert layer.weight.grad is not None


def test_minilm_moves_its_hidden_model(minilm):
    minilm.embed(["x"])
    minilm.to(torch.float64)
    try:
        assert next(minilm._model.parameters()).dtype == torch.float64 and not minilm._cache
    finally:
        minilm.to(torch.float32)


def test_minilm_missing_model_is_one_clear_line(tmp_path, empty_hub_cache):
    with pytest.raises(SpecError, match="conditioner.model: folder .*not found"):
        build({"type": "minilm", "model": str(tmp_path / "nowhere")})
    by_name = build({"type": "minilm", "model": "n2a-tests/no-such-model"})
    with pytest.raises(SpecError, match="cannot load .*offline") as info:
        by_name.embed(["hello"])
    assert "\n" not in str(info.value)


# -- OpenCLIP -------------------------------------------------------------------------------
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A small standard OpenCLIP model saved as open_clip does: config + weights in a folder."""
    import open_clip

    folder = tmp_path_factory.mktemp("tiny-clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    torch.manual_seed(0)
    reference = open_clip.CLIP(**TINY_CLIP).eval()
    torch.save(reference.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder, reference


def test_clip_vector_is_the_normalised_clip_text_embedding(tiny_clip_dir):
    import open_clip

    folder, reference = tiny_clip_dir
    cond = build({"type": "clip", "model": f"local-dir:{folder}"})
    texts = ["a red apple", "a rocket ship"]
    with torch.no_grad():
        expected = reference.encode_text(open_clip.get_tokenizer("ViT-B-32")(texts), normalize=True)
    torch.testing.assert_close(cond.embed(texts), expected)
    assert cond.dim == 32 and cond.output == "vector" and cond.state_dict() == {} and not cond.trainable
    torch.testing.assert_close(cond.null_embedding(2), torch.zeros(2, 32))


def test_clip_sequence_holds_the_tokens_the_vector_pools(tiny_clip_dir):
    import open_clip

    folder, reference = tiny_clip_dir
    seq = build({"type": "clip", "model": f"local-dir:{folder}", "output": "sequence"})
    vec = build({"type": "clip", "model": f"local-dir:{folder}"})
    texts = ["a red apple", "a rocket ship", "x"]
    tokens = seq.embed(texts)
    assert tokens.shape == (3, 77, 64) and seq.dim == 64 and seq.null_embedding(2).shape == (2, 77, 64)
    # CLIP pools the end-of-text token (the largest id) and projects it (Radford et al. 2021, sec. 2.4)
    eot = open_clip.get_tokenizer("ViT-B-32")(texts).argmax(dim=-1)
    pooled = tokens[torch.arange(3), eot] @ reference.text_projection.detach()
    torch.testing.assert_close(vec.embed(texts), torch.nn.functional.normalize(pooled, dim=-1))


def test_clip_random_weights_warn():
    with pytest.warns(UserWarning, match="random weights"):
        cond = ClipConditioner("ViT-S-32", pretrained=None)
    assert cond.embed(["a", "b"]).shape == (2, 384)


def test_clip_never_downloads_and_says_what_to_do(empty_hub_cache):
    with pytest.raises(SpecError, match="not in the local Hugging Face cache.*`hf download timm/vit_base_patch32_clip"):
        build({"type": "clip", "model": "ViT-B-32", "pretrained": "openai"})
    with pytest.raises(SpecError, match=r"'opanai' is neither a checkpoint file nor a tag of ViT-B-32") as info:
        build({"type": "clip", "model": "ViT-B-32", "pretrained": "opanai"})
    assert "(did you mean 'openai'?)" in str(info.value)
    with pytest.raises(SpecError, match=r"unknown OpenCLIP architecture 'ViT-B-33' \(did you mean 'ViT-B-32'\?\)"):
        build({"type": "clip", "model": "ViT-B-33"})
    with pytest.raises(N2AError, match="carries its own weights"):
        get_registry().validate_spec("conditioner", {"type": "clip", "model": "local-dir:/x", "pretrained": "openai"})
