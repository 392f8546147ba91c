"""Speed and memory around a loaded model: fp8 layers, LoRA, torch.compile and CUDA graphs, block offload.

Each path changes how the model runs, never what it computes (fp8 and the fast mode within their stated
error), and can be turned on or off on a model that is already loaded.
"""
