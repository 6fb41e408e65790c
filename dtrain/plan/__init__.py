"""`dtrain plan`: will this run fit, and what is the cheapest configuration that does — from config.json alone.

Memory is given per GPU, in CPU RAM per node and on NVMe per node, in five parts:

- parameters, gradients, optimizer states: the model states. For full fine-tuning with Adam in bf16 they equal
  DeepSpeed's own estimators (`estimate_zero2/3_model_states_mem_needs`, a test compares them), including their
  1.5x host-memory safety factor, which is shown under buffers.
- activations: what autograd keeps for the backward pass (`activation_bytes`).
- buffers: ZeRO-3's gathered largest layer, DeepSpeed's fp32 step buffer, its host safety factor and load-time
  peak, communication buckets, swap buffers, and a per-process CUDA/host allowance.

Everything here is a pure function of the model shape, our Config and the hardware: no weights, no process group.

    shape.py     model shape and exact parameter counts from config.json
    memory.py    model states, activations and their placement
    hardware.py  nodes, GPUs and memory sizes
    choices.py   the configurations compared and the cheapest that fits
    report.py    the printed plan and the fit check of check/submit
"""
