"""Triton kernels of the CUDA forward: mixed-adapter LoRA/DoRA (`lora`) and paged decode attention (`attention`).

`server.model.backend` decides when they run. Every kernel is tested against the torch reference on CPU under
Triton's interpreter (`TRITON_INTERPRET=1`, set before this package is imported), and on a GPU by `bench/gpu_check.sh`.
"""
