"""pixfound: does a multimodal LLM know where the things it talks about are, at the pixel level?"""

__version__ = "0.1.0"
