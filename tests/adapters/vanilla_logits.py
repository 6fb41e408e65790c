"""python -m tests.adapters.vanilla_logits INPUT OUT SPEC [SPEC ...]

Loads exported models with nothing but transformers and peft, as a user would in a fresh process, and saves their
logits on the batch in INPUT (a logits.pt from probe_run) to OUT as {spec: logits}. A SPEC is one of
    hf:DIR                      AutoModelForCausalLM.from_pretrained(DIR)
    hf4bit:DIR                  the same, loaded 4-bit NF4 (double quant, bf16 compute: the QLoRA defaults)
    adapter:BASE:DIR            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), DIR)
    adapter4bit:BASE:DIR        the same with the base loaded 4-bit NF4 (double quant, bf16 compute)
    adapter4bit-norepack:BASE:DIR   the same, bitsandbytes' CPU weight repacking off (support_avx512bf16_for_cpu =
                                False on every Linear4bit), the user's workaround in docs/bnb-cpu-repack-dora.md
No dtrain import: this is the vanilla-library check.
"""

from __future__ import annotations

import sys

import torch


def load(spec: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    kind, *paths = spec.split(":")
    kwargs = {}
    if "4bit" in kind:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if kind.startswith("hf"):
        return AutoModelForCausalLM.from_pretrained(paths[0], **kwargs)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(paths[0], dtype=torch.float32, **kwargs)
    if kind.endswith("-norepack"):
        from bitsandbytes.nn import Linear4bit

        for module in base.modules():
            if isinstance(module, Linear4bit):
                module.support_avx512bf16_for_cpu = False
    return PeftModel.from_pretrained(base, paths[1])


def main() -> None:
    source, out, *specs = sys.argv[1:]
    input_ids = torch.load(source)["input_ids"]
    results = {}
    for spec in specs:
        model = load(spec).eval()
        with torch.no_grad():
            results[spec] = model(input_ids=input_ids, use_cache=False).logits.float()
    torch.save(results, out)


if __name__ == "__main__":
    main()
