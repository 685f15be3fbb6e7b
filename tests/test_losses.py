"""higgs_diag.losses on hand-made tensors (torch only)."""
import math

import pytest
import torch
import torch.nn.functional as F

from higgs_diag.losses import IGNORE_INDEX, dual_loss, higgs_audio_loss, uniform_reference

V = 6  # codebook_size 4 + stream BOS 4 + stream EOS 5
BOS, EOS = 4, 5


def _copy_logits(inputs, scale=30.0):
    """audio_logits [N, C, V] that put all mass on the *current* input token (what a copy-task model learns)."""
    return F.one_hot(inputs.t(), V).float() * scale


def _segment():
    # one segment, 2 codebooks, no delay: inputs [BOS, codes, EOS], labels [-100, codes, EOS]
    codes = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    inputs = torch.cat([torch.full((2, 1), BOS), codes, torch.full((2, 1), EOS)], 1)
    labels = torch.cat([torch.full((2, 1), IGNORE_INDEX), codes, torch.full((2, 1), EOS)], 1)
    return inputs, labels


def test_uniform_reference():
    assert uniform_reference(1026) == pytest.approx(6.9334, abs=1e-4)
    assert uniform_reference(18) == pytest.approx(math.log(18))
    with pytest.raises(ValueError):
        uniform_reference(0)


def test_shift_copy_predictor_low_unshifted_high_shifted():
    inputs, labels = _segment()
    audio_logits = _copy_logits(inputs)
    unshifted = dual_loss(None, None, audio_logits, labels, unshifted=True)
    shifted = dual_loss(None, None, audio_logits, labels)
    assert unshifted.audio_loss.item() < 1e-6  # copying the input is "perfect" without the shift
    assert shifted.audio_loss.item() > 10.0  # and terrible for next-token prediction
    assert shifted.n_audio_targets == 10 and shifted.n_audio_targets_per_codebook == (5, 5)
    # the unshifted variant scores position 0 too, but it is -100 there: same number of targets
    assert unshifted.n_audio_targets == 10
    assert unshifted.unshifted and not shifted.unshifted


def test_shift_next_token_predictor_is_exact():
    inputs, labels = _segment()
    # logits at position i predict label i + 1; last position predicts nothing
    nxt = torch.cat([inputs[:, 1:], torch.zeros(2, 1, dtype=torch.long)], 1)
    res = dual_loss(None, None, _copy_logits(nxt), labels)
    assert res.audio_loss.item() < 1e-6
    assert res.loss.item() == pytest.approx(res.audio_loss.item())


def test_per_codebook_mean_is_mean_of_codebook_means():
    torch.manual_seed(0)
    n, c = 7, 3
    audio_logits = torch.randn(n, c, V)
    labels = torch.randint(0, V, (c, n))
    labels[:, 0] = IGNORE_INDEX
    labels[0, 3:] = IGNORE_INDEX  # codebook 0 has fewer targets: a token-mean would weight it less
    res = dual_loss(None, None, audio_logits, labels)
    expected = [F.cross_entropy(audio_logits[:-1, k], labels[k, 1:], ignore_index=IGNORE_INDEX) for k in range(c)]
    assert torch.allclose(res.codebook_losses, torch.stack(expected))
    assert res.audio_loss.item() == pytest.approx(torch.stack(expected).mean().item())
    assert res.n_audio_targets_per_codebook == (2, 6, 6)
    assert res.as_floats()["audio_loss_cb1"] == pytest.approx(expected[1].item())


def test_text_loss_shift_and_ignore_index():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, 3, 4, -100, 7], [-100, -100, 1, 2, -100]])
    res = dual_loss(logits, labels, None, None)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert res.text_loss.item() == pytest.approx(expected.item())
    assert res.n_text_targets == 5
    assert res.audio_loss is None and res.loss.item() == pytest.approx(expected.item())


def test_ignore_index_does_not_change_the_mean():
    inputs, labels = _segment()
    audio_logits = torch.randn(inputs.shape[1], 2, V)
    full = dual_loss(None, None, audio_logits, labels)
    masked = labels.clone()
    masked[1, 2] = IGNORE_INDEX
    part = dual_loss(None, None, audio_logits, masked)
    assert part.n_audio_targets_per_codebook == (5, 4)
    assert part.codebook_losses[0].item() == pytest.approx(full.codebook_losses[0].item())
    exp = F.cross_entropy(audio_logits[:-1, 1], masked[1, 1:], ignore_index=IGNORE_INDEX)
    assert part.codebook_losses[1].item() == pytest.approx(exp.item())


def test_zero_valid_audio_targets_is_flagged_not_zero_or_nan():
    logits = torch.randn(1, 4, 11, requires_grad=True)
    labels = torch.tensor([[-100, 3, 4, 5]])
    audio_logits = torch.randn(6, 2, V, requires_grad=True)
    audio_labels = torch.full((2, 6), IGNORE_INDEX)
    res = dual_loss(logits, labels, audio_logits, audio_labels)
    assert res.audio_loss is None and res.n_audio_targets == 0
    assert res.n_audio_targets_per_codebook == (0, 0)
    assert torch.isnan(res.codebook_losses).all()
    assert res.loss.item() == pytest.approx(res.text_loss.item())
    assert torch.isfinite(res.loss)
    res.loss.backward()


def test_one_codebook_without_targets_is_left_out_of_the_mean():
    audio_logits = torch.randn(5, 2, V)
    labels = torch.tensor([[-100, 1, 2, 3, 5], [-100] * 5])
    res = dual_loss(None, None, audio_logits, labels)
    assert math.isnan(res.codebook_losses[1].item())
    assert res.audio_loss.item() == pytest.approx(res.codebook_losses[0].item())
    assert res.as_floats()["audio_loss_cb1"] is None


def test_no_targets_at_all_gives_attached_zero_and_empty():
    logits = torch.randn(1, 3, 11, requires_grad=True)
    res = dual_loss(logits, torch.full((1, 3), -100), torch.zeros(0, 2, V), torch.zeros(2, 0, dtype=torch.long))
    assert res.empty and res.loss.item() == 0.0
    res.loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() == 0


def test_audio_logits_empty_but_labels_present_raises():
    _, labels = _segment()
    with pytest.raises(ValueError, match="audio_out_ids"):
        dual_loss(None, None, torch.zeros(0, 2, V), labels)


def test_higgs_audio_loss_reads_model_outputs():
    inputs, labels = _segment()
    logits = torch.randn(1, 4, 11)
    outputs = {"logits": logits, "expanded_labels": torch.tensor([[-100, 2, -100, 3]]),
               "audio_logits": _copy_logits(inputs)}
    res = higgs_audio_loss(outputs, labels, unshifted=True)
    assert res.audio_loss.item() < 1e-6 and res.n_text_targets == 2
    assert res.loss.item() == pytest.approx(res.text_loss.item() + res.audio_loss.item())
