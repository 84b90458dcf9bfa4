"""BitNet b1.58 layers and model surgery. Pure PyTorch: nothing here knows about DeepSpeed."""

from megadistil.bitnet.kernels import Hardware, Kernel, code_matmul, hardware, resolve_dtype, resolve_kernel
from megadistil.bitnet.linear import BitLinear, BitLinearFunction, DeltaFormat, SubLN, frozen_weight_codes
from megadistil.bitnet.quant import (
    compile_by_default,
    compile_quantizers,
    int8_codes,
    pack_ternary,
    q3,
    q8,
    ternary_codes,
    unpack_ternary,
)
from megadistil.bitnet.surgery import BitNetConfig, bitlinear_modules, set_quant_lambda, teacher_mode, to_bitnet

__all__ = [
    "BitLinear", "BitLinearFunction", "BitNetConfig", "DeltaFormat", "Hardware", "Kernel", "SubLN",
    "bitlinear_modules", "code_matmul", "compile_by_default", "compile_quantizers", "frozen_weight_codes",
    "hardware", "int8_codes", "pack_ternary", "q3", "q8", "resolve_dtype", "resolve_kernel", "set_quant_lambda",
    "teacher_mode", "ternary_codes", "to_bitnet", "unpack_ternary",
]
