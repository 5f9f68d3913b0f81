"""Names of torch dtypes as configs and command lines spell them."""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
