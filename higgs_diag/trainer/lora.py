"""LoRA for Higgs Audio v2 with Higgs-aware defaults.

Default targets: the attention projections (``self_attn.{q,k,v,o}_proj``) and the text MLP
(``mlp.{gate,up,down}_proj``) of every decoder layer. The DualFFN audio MLP (``audio_mlp.{gate,up,down}_proj``,
present in the ``audio_dual_ffn_layers``) is left alone unless ``audio_mlp=True``: a plain list of suffixes
such as ``["gate_proj", ...]`` would silently adapt it too. Seed 000's values: rank 8-32, alpha about twice
the rank, dropout 0.1 (defaults r=16, alpha=32, dropout=0.1).

A PEFT model saves ``adapter_model.safetensors`` + ``adapter_config.json`` in every checkpoint the
HiggsAudioTrainer writes (also when the PEFT model sits inside a wrapper module), so a checkpoint loads on its
own: ``PeftModel.from_pretrained(HiggsAudioModel(config), "out/checkpoint-500")``.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

logger = logging.getLogger("higgs_diag.trainer")

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def default_targets(audio_mlp: bool = False) -> str:
    """The target regex (peft full-matches it against module names): attention + text MLP of every layer,
    plus the DualFFN audio MLP when ``audio_mlp``. ``(?:.*\\.)?mlp`` needs a dot before ``mlp``, so
    ``audio_mlp`` is not matched by the text-MLP branch."""
    parts = [rf"self_attn\.(?:{'|'.join(ATTENTION)})", rf"mlp\.(?:{'|'.join(MLP)})"]
    if audio_mlp:
        parts.append(rf"audio_mlp\.(?:{'|'.join(MLP)})")
    return rf"(?:.*\.)?(?:{'|'.join(parts)})"


def lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.1, targets: str | Sequence[str] | None = None,
                *, audio_mlp: bool = False, **kwargs: Any):
    """A ``peft.LoraConfig`` with the defaults above. ``targets``: None for the Higgs defaults, a regex string,
    or a list of module-name suffixes (peft's own semantics). Extra ``kwargs`` go to LoraConfig."""
    from peft import LoraConfig

    target_modules = default_targets(audio_mlp) if targets is None else (
        targets if isinstance(targets, str) else list(targets))
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, **kwargs)


def apply_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.1,
               targets: str | Sequence[str] | None = None, *, audio_mlp: bool = False, **kwargs: Any):
    """Wrap a ``HiggsAudioModel`` with LoRA adapters (``peft.get_peft_model``) and return the PEFT model.

    Only the adapters train; the trainer's checkpoints hold the adapter files. To use a wrapper module, apply
    LoRA to the HiggsAudioModel first and wrap the result.
    """
    from peft import get_peft_model

    cfg = lora_config(r, alpha, dropout, targets, audio_mlp=audio_mlp, **kwargs)
    peft_model = get_peft_model(model, cfg)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    adapted = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A" in n})
    logger.info("LoRA r=%d alpha=%d dropout=%g on %d modules (%s...): %d of %d parameters trainable",
                r, alpha, dropout, len(adapted), ", ".join(adapted[:3]), trainable, total)
    return peft_model
