"""Names of torch dtypes as configs and command lines spell them."""

from typing import Literal

import torch

DType = Literal["float32", "bfloat16", "float16"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # keys: DType's values
