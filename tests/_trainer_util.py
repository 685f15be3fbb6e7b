"""Shared pieces of the trainer tests: the fixtures' tiny HiggsAudioModel and data (fixtures/make_runs.py),
boson's real HiggsAudioSampleCollator on ChatMLDatasetSample objects, and TrainingArguments for short CPU runs."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fixtures"))
import make_runs as M  # noqa: E402

from transformers import TrainingArguments  # noqa: E402

UNIFORM = math.log(M.CODEBOOK_SIZE + 2)  # ln(18): the audio loss of a uniform guess
torch.set_num_threads(2)


def targs(out, **kw) -> TrainingArguments:
    """TrainingArguments for a short, quiet CPU run (override anything)."""
    base = dict(output_dir=str(out), overwrite_output_dir=True, report_to=[], logging_steps=1,
                per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=3e-3, weight_decay=0.0,
                warmup_steps=5, lr_scheduler_type="linear", max_steps=10, save_strategy="no", use_cpu=True,
                disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, seed=M.SEED,
                logging_nan_inf_filter=False)
    base.update(kw)
    return TrainingArguments(**base)


def state(out_dir: Path) -> dict:
    """The trainer_state.json of the newest checkpoint (or the run root)."""
    out_dir = Path(out_dir)
    cands = sorted(out_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    path = cands[-1] if cands else out_dir / "trainer_state.json"
    return json.loads(path.read_text())


# ---- boson's real collator -------------------------------------------------------------------------------
def boson_collator(**kw):
    from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator

    base = dict(whisper_processor=None, audio_in_token_id=M.AUDIO_IN, audio_out_token_id=M.AUDIO_OUT,
                pad_token_id=M.PAD, audio_stream_bos_id=M.STREAM_BOS, audio_stream_eos_id=M.STREAM_EOS,
                round_to=M.ROUND_TO, encode_whisper_embed=False, return_audio_in_tokens=True,
                audio_num_codebooks=M.NUM_CODEBOOKS, use_delay_pattern=True)
    base.update(kw)
    return HiggsAudioSampleCollator(**base)


def chatml_samples(n: int, seed: int, **kw) -> list:
    """The fixtures' synthetic TTS samples as boson ChatMLDatasetSample objects (one audio-out turn each)."""
    from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample

    out = []
    for s in M.make_samples(n, seed, **kw):
        codes = s["audio_codes"]
        out.append(ChatMLDatasetSample(
            input_ids=s["input_ids"], label_ids=s["label_ids"], audio_ids_concat=codes,
            audio_ids_start=torch.tensor([0]), audio_waveforms_concat=torch.zeros(0),
            audio_waveforms_start=torch.zeros(0, dtype=torch.long), audio_sample_rate=torch.zeros(0),
            audio_speaker_indices=torch.zeros(0, dtype=torch.long)))
    return out


class CachedDataset(torch.utils.data.Dataset):
    """Hands out the same sample objects every epoch (a cache): what boson's in-place writes break."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]
