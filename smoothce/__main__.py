"""python -m smoothce: versions and what the installed library was built with."""
import torch

import smoothce

info = smoothce.build_info()
print(f"smoothce {smoothce.__version__}")
print(f"torch {torch.__version__} (CUDA runtime {torch.version.cuda or 'none'}, {torch.get_num_threads()} CPU threads)")
print(f"CPU kernels: {info['cpu_capability']}" + (" with AVX512-BF16 conversions" if info.get("cpu_bf16") else ""))
cuda = info["cuda"]
if cuda == "no":
    print("CUDA kernels: not built")
else:
    print(f"CUDA kernels: built for {info.get('cuda_archs', '?')}; GPU visible: {torch.cuda.is_available()}")
