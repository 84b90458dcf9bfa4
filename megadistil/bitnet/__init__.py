"""BitNet b1.58 layers and model surgery. Pure PyTorch: nothing here knows about DeepSpeed."""

from megadistil.bitnet.linear import BitLinear, BitLinearFunction, SubLN
from megadistil.bitnet.quant import compile_quantizers, int8_codes, pack_ternary, q3, q8, ternary_codes, unpack_ternary
from megadistil.bitnet.surgery import BitNetConfig, bitlinear_modules, set_quant_lambda, teacher_mode, to_bitnet

__all__ = [
    "BitLinear", "BitLinearFunction", "BitNetConfig", "SubLN", "bitlinear_modules", "compile_quantizers", "int8_codes", "pack_ternary",
    "q3", "q8", "set_quant_lambda", "teacher_mode", "ternary_codes", "to_bitnet", "unpack_ternary",
]
