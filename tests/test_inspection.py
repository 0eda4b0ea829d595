"""slm.inspection against direct calls of the model, and slm.plots drawing from it."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from app_helpers import playground_config

from slm import build_model, plots
from slm.config import GLOBAL, SLIDING
from slm.inspection import (
    fit_to_length,
    inspect_ids,
    inspect_text,
    logit_lens,
    next_token_logits,
    sampling_view,
)
from slm.sampling import next_token_probabilities


@pytest.fixture(scope="module")
def small_model():
    return build_model(playground_config(), device="cpu", dtype=torch.float32, seed=0).eval()


TEXT = "Once upon a time, there was a little dog named Max. He liked to play in the park."


def direct_log_probs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def test_token_probabilities_match_the_model(small_model, tokenizer):
    result = inspect_text(small_model, tokenizer, TEXT)
    ids = tokenizer.encode(TEXT)
    assert result.token_ids == ids
    assert result.tokens == tokenizer.token_strings(ids)
    assert "".join(result.tokens) == TEXT
    log_probs = direct_log_probs(small_model, ids)
    assert result.token_probabilities[0] is None
    expected = [math.exp(log_probs[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert result.token_probabilities[1:] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert len(set(np.round(expected, 6))) > 5  # the numbers really vary from token to token


def test_next_token_candidates_and_entropy(small_model, tokenizer):
    ids = tokenizer.encode(TEXT)
    result = inspect_ids(small_model, tokenizer, ids, top_k=7)
    log_probs = direct_log_probs(small_model, ids)
    for position in (0, 5, len(ids) - 1):
        view = result.next_tokens[position]
        assert view.position == position
        probs = log_probs[position].exp()
        top = torch.topk(probs, 7)
        assert [c.token_id for c in view.candidates] == top.indices.tolist()
        assert [c.probability for c in view.candidates] == pytest.approx(top.values.tolist(), rel=1e-4)
        assert [c.text for c in view.candidates] == tokenizer.token_strings(top.indices.tolist())
        # the entropy streams over slices of the vocabulary (online softmax): exact to fp32 rounding,
        # judged against float64 (an fp32 Categorical is itself ~4e-6 nats off here)
        expected_entropy = float(torch.distributions.Categorical(logits=log_probs[position].double()).entropy())
        assert view.entropy == pytest.approx(expected_entropy, rel=1e-6)
        assert view.effective_choices == pytest.approx(math.exp(view.entropy))


def test_statistics_merged_over_many_vocabulary_slices_equal_the_whole_softmax(small_model, tokenizer, monkeypatch):
    """Slices of 997 entries (the last one partial), so each position's running maximum changes as slices
    arrive: the online-softmax merging is what is tested, against float64 over the whole vocabulary."""
    ids = tokenizer.encode(TEXT)
    monkeypatch.setattr("slm.inspection.LOGIT_CHUNK_ELEMENTS", len(ids) * 997)
    result = inspect_ids(small_model, tokenizer, ids, top_k=6)
    with torch.no_grad():
        log_probs = torch.log_softmax(small_model(torch.tensor([ids]))[0].double(), dim=-1)
    expected_seen = [math.exp(log_probs[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert result.token_probabilities[1:] == pytest.approx(expected_seen, rel=1e-4, abs=1e-7)
    for position, view in enumerate(result.next_tokens):
        top = torch.topk(log_probs[position].exp(), 6)
        assert [c.token_id for c in view.candidates] == top.indices.tolist()
        assert [c.probability for c in view.candidates] == pytest.approx(top.values.tolist(), rel=1e-4)
        entropy = float(-(log_probs[position].exp() * log_probs[position]).sum())
        assert view.entropy == pytest.approx(entropy, rel=1e-6)


def test_attention_maps_follow_causality_and_the_sliding_window(small_model, tokenizer):
    result = inspect_text(small_model, tokenizer, TEXT)
    T = len(result)
    assert result.layer_types == [SLIDING, SLIDING, GLOBAL]
    assert len(result.attentions) == 3
    q = np.arange(T)[:, None]
    k = np.arange(T)[None, :]
    for layer, maps in enumerate(result.attentions):
        assert maps.shape == (2, T, T)
        np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
        assert np.all(maps[:, k > q] == 0)  # nothing from the future
        window = result.window_of(layer)
        if window is None:
            assert np.all(maps[:, q - k >= 4] > 0)  # a global layer sees far back
        else:
            assert window == 4
            assert np.all(maps[:, (q - k >= window)] == 0)  # outside the band: nothing
            assert np.all(maps[:, (q - k < window) & (k <= q)] > 0)


def test_logit_lens_ends_at_the_model_prediction(small_model, tokenizer):
    result = inspect_text(small_model, tokenizer, TEXT)
    position = 6
    rows = logit_lens(small_model, tokenizer, result, position, top_k=3)
    assert [r.depth for r in rows] == [0, 1, 2, 3]
    assert [r.label for r in rows] == ["embeddings", "layer 1 (sliding)", "layer 2 (sliding)", "layer 3 (global)"]
    final = rows[-1].candidates
    assert [c.token_id for c in final] == [c.token_id for c in result.next_tokens[position].candidates[:3]]
    assert [c.probability for c in final] == pytest.approx(
        [c.probability for c in result.next_tokens[position].candidates[:3]], rel=1e-4
    )
    # depth 0 reads the embedding through the final norm and the (tied) head
    ids = torch.tensor([result.token_ids])
    with torch.no_grad():
        embedded = small_model.embed(ids)[0, position]
        probs = torch.softmax(small_model.logits(small_model.norm(embedded)).float(), -1)
    assert rows[0].candidates[0].token_id == int(probs.argmax())
    assert rows[0].candidates[0].probability == pytest.approx(float(probs.max()), rel=1e-4)
    with pytest.raises(ValueError, match="position"):
        logit_lens(small_model, tokenizer, result, len(result))


def test_long_texts_keep_their_last_tokens(small_model, tokenizer):
    ids = tokenizer.encode(TEXT * 8)
    assert len(ids) > 64
    result = inspect_ids(small_model, tokenizer, ids)
    assert len(result) == 64  # the context length
    assert result.token_ids == ids[-64:]
    assert result.dropped_tokens == len(ids) - 64
    short = inspect_ids(small_model, tokenizer, ids, max_tokens=10)
    assert short.token_ids == ids[-10:]
    assert fit_to_length([1, 2, 3], 5) == ([1, 2, 3], 0)
    with pytest.raises(ValueError, match="empty"):
        inspect_text(small_model, tokenizer, "")


def test_next_token_logits_match_a_full_forward(small_model, tokenizer):
    ids = tokenizer.encode(TEXT)
    with torch.no_grad():
        expected = small_model(torch.tensor([ids]))[0, -1]
    torch.testing.assert_close(next_token_logits(small_model, ids), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, None, None), (0.7, 3, None), (1.5, None, 0.5), (0.0, None, None)]
)
def test_sampling_view_before_and_after(small_model, tokenizer, temperature, top_k, top_p):
    logits = next_token_logits(small_model, tokenizer.encode(TEXT))
    view = sampling_view(logits, tokenizer, temperature, top_k, top_p, count=8)
    raw = torch.softmax(logits, -1)
    processed = next_token_probabilities(logits, temperature, top_k, top_p)
    top = torch.topk(raw, 8)
    assert [c.token_id for c in view.candidates] == top.indices.tolist()
    assert [c.probability for c in view.candidates] == pytest.approx(top.values.tolist(), rel=1e-4)
    assert [c.sampling_probability for c in view.candidates] == pytest.approx(
        processed[top.indices].tolist(), rel=1e-4, abs=1e-9
    )
    assert view.tokens_kept == int((processed > 0).sum())
    if temperature == 0:
        assert view.tokens_kept == 1
        assert view.candidates[0].sampling_probability == pytest.approx(1.0)
        assert view.sampling_entropy == pytest.approx(0.0, abs=1e-6)
    if top_k:
        assert view.tokens_kept == top_k
        assert all(c.sampling_probability == 0 for c in view.candidates[top_k:])
    if top_p:
        assert view.tokens_kept < tokenizer.vocab_size
    assert view.entropy == pytest.approx(float(torch.distributions.Categorical(logits=logits).entropy()), rel=1e-4)


def _png_size(fig) -> tuple[int, int]:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    from PIL import Image

    return Image.open(io.BytesIO(buffer.getvalue())).size


def test_figures_render(small_model, tokenizer):
    """Every figure draws from real inspection data, and the attention plot greys what a layer cannot see."""
    text = "The $5 cat\nsat on the mat. " * 2
    result = inspect_text(small_model, tokenizer, text)
    tokens = result.tokens
    sliding = plots.attention_heatmap(result.attentions[0][1], tokens, "layer 1", head=1, window=4)
    image = sliding.axes[0].images[0].get_array()
    assert image.mask.sum() == (np.arange(len(tokens))[:, None] - np.arange(len(tokens))[None, :] >= 4).sum() + (
        len(tokens) * (len(tokens) - 1) // 2
    )
    glob = plots.attention_heatmap(result.attentions[2][0], tokens, "layer 3", head=0, window=None)
    assert glob.axes[0].images[0].get_array().mask.sum() == len(tokens) * (len(tokens) - 1) // 2
    grid = plots.attention_grid(result.attentions[0], tokens, "layer 1", window=4)
    assert sum(1 for ax in grid.axes if ax.images) == 2
    bars = plots.next_token_bars(result.next_tokens[3], tokens[3])
    view = sampling_view(next_token_logits(small_model, result.token_ids), tokenizer, 0.8, 5, 0.9)
    sampled = plots.sampling_bars(view)
    lens = plots.logit_lens_figure(logit_lens(small_model, tokenizer, result, 3), 3, tokens[3])
    for fig in (sliding, glob, grid, bars, sampled, lens):
        width, height = _png_size(fig)
        assert width > 400 and height > 150
    labels = [t.get_text() for t in sliding.axes[0].get_yticklabels()]
    assert "␣cat" in labels and "↵" in "".join(labels) and r"␣\$" in labels


def test_describe_settings():
    assert plots.describe_settings(0, 5, 0.5) == "greedy (temperature 0)"
    assert plots.describe_settings(0.8, 50, 0.9) == "temperature 0.8, top-k 50, top-p 0.9"
    assert plots.describe_settings(1.0, 0, 1.0) == "temperature 1"
