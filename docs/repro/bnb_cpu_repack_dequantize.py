"""bitsandbytes 0.50 on a CPU with AVX512-BF16: after one eval-mode forward, a Linear4bit's weight no longer
dequantizes to itself. peft's DoRA reads the base weight that way (peft.utils.integrations.dequantize_module_weight)
at every forward, so a DoRA adapter on a 4-bit base gives wrong logits in inference on such CPUs.

    python docs/repro/bnb_cpu_repack_dequantize.py
prints the largest difference between the dequantized weight before and after one forward (0.0 where the CPU
has no AVX512-BF16, or with support_avx512bf16_for_cpu = False). See docs/bnb-cpu-repack-dora.md.
"""

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch

torch.manual_seed(0)
for repack in (True, False):
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes
    layer.support_avx512bf16_for_cpu = repack
    before = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    with torch.no_grad():
        layer.eval()(torch.randn(2, 64, dtype=torch.bfloat16))
    after = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    print(f"support_avx512bf16_for_cpu={repack}: max |dequantized after - before| = {(after - before).abs().max():.4f}")
