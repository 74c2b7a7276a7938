import os

from pixfound.triton_kernels import default_to_interpreter_without_cuda

default_to_interpreter_without_cuda()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
