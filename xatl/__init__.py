"""xatl: turn a pretrained transformer into a linear-cost-inference model by cross-architecture
transfer learning. `import xatl` registers the model with transformers' `Auto*` classes, and its
int8 format (`xatl.quantization`) with transformers' quantizers."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from xatl.artifacts import read_transfer_report
from xatl.config import XatlConfig
from xatl.convert import Conversion, convert
from xatl.donors import Donor, load_donor
from xatl.model import XatlCache, XatlForCausalLM, XatlModel
from xatl.quantization import register as _register_quantization

AutoConfig.register(XatlConfig.model_type, XatlConfig, exist_ok=True)
AutoModel.register(XatlConfig, XatlModel, exist_ok=True)
AutoModelForCausalLM.register(XatlConfig, XatlForCausalLM, exist_ok=True)
_register_quantization()  # quantization_config {"quant_method": "xatl"}: folders saved with int8 weights

__version__ = "0.1.0"

__all__ = [
    "Conversion",
    "Donor",
    "XatlCache",
    "XatlConfig",
    "XatlForCausalLM",
    "XatlModel",
    "__version__",
    "convert",
    "load_donor",
    "read_transfer_report",
]
