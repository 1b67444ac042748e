"""Compile one program and read what the compiler says about it: per-chip memory (arguments, outputs,
temporaries), FLOPs, the largest buffers, and a projected throughput."""

from __future__ import annotations

import dataclasses
import math
import re
import time

GIB = 1 << 30
MFU = 0.4  # the projection's assumed model-FLOPs utilisation
_BUFFER = re.compile(r"%(\S+) = ([a-z]+\d*)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


@dataclasses.dataclass
class Compiled:
    name: str
    note: str
    arguments: int  # bytes per chip: params, optimizer state, batch
    outputs: int
    aliased: int  # outputs that reuse donated arguments
    temporaries: int
    code: int
    flops: float  # per chip per call: the model's FLOPs (aot.flops) over the chips
    compiler_flops: float  # per chip per call as cost_analysis() counts it (loop bodies once)
    tokens: int  # per call, whole slice
    seconds: float  # compile time here
    largest: list  # [(bytes, "name dtype[shape]")]

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    def fraction(self, hbm_bytes: int) -> float:
        return self.total / hbm_bytes

    def tokens_per_second_per_chip(self, chips: int, peak_flops: float) -> float:
        """At MFU x peak: tokens per call / chips over the time the FLOPs take."""
        if not self.flops:
            return float("nan")
        return self.tokens / chips / (self.flops / (MFU * peak_flops))

    def row(self, hbm_bytes: int, chips: int, peak_flops: float) -> dict:
        return {"program": self.name, "note": self.note, "params_and_state_gib": round(self.arguments / GIB, 3),
                "temporaries_gib": round(self.temporaries / GIB, 3), "total_gib": round(self.total / GIB, 3),
                "hbm_gib": round(hbm_bytes / GIB, 2), "hbm_fraction": round(self.fraction(hbm_bytes), 4),
                "tflops_per_chip": round(self.flops / 1e12, 4),
                "compiler_tflops_per_chip": round(self.compiler_flops / 1e12, 4),
                "tokens_per_s_per_chip_at_40pct_mfu": round(self.tokens_per_second_per_chip(chips, peak_flops), 1),
                "compile_s": round(self.seconds, 1),
                "largest_buffers": [f"{b / GIB:.3f} GiB {what}" for b, what in self.largest[:3]]}


def largest_buffers(hlo_text: str, count: int = 5) -> list:
    """The `count` biggest array shapes an optimized HLO module materialises, as (bytes, 'dtype[shape] xN'),
    N the number of HLO values of that shape (one buffer often appears under several names, e.g. as a
    loop's carry). Values inside fusions never reach memory, so fused computations are skipped."""
    seen, fused = {}, False  # (dtype, dims) -> [bytes, count]
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():  # a computation header (or its closing brace)
            fused = "fused" in line.split("(")[0] or "wrapped" in line.split("(")[0]
            continue
        m = _BUFFER.search(line)
        if fused or not m:
            continue
        _, dtype, dims = m.groups()
        if dtype not in _BYTES:
            continue
        _count(seen, dtype, [int(d) for d in filter(None, dims.split(","))], _BYTES[dtype])
    return _ranked(seen, count)


def _count(seen: dict, dtype: str, shape: list, itemsize: int) -> None:
    seen.setdefault((dtype, ",".join(map(str, shape))), [itemsize * math.prod(shape), 0])[1] += 1


def _ranked(seen: dict, count: int) -> list:
    return sorted(((size, f"{dtype}[{dims}] x{n}") for (dtype, dims), (size, n) in seen.items()), reverse=True)[:count]


_MLIR_TENSOR = re.compile(r"tensor<((?:\d+x)+)(f32|bf16|f16|i32|i64|i8|i1)>")
_MLIR_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "i32": 4, "i64": 8, "i8": 1, "i1": 1}


def largest_tensors(mlir_text: str, count: int = 5) -> list:
    """The biggest tensor types in a lowered (not yet optimized) program, as (bytes, 'dtype[shape] xN')."""
    seen = {}
    for dims, dtype in _MLIR_TENSOR.findall(mlir_text):
        _count(seen, dtype, [int(d) for d in dims.rstrip("x").split("x")], _MLIR_BYTES[dtype])
    return _ranked(seen, count)


class OutOfMemory(Exception):
    """The compiler refused the program for the chip's HBM; `largest` are the program's biggest tensors."""

    def __init__(self, message: str, largest: list):
        super().__init__(message)
        self.largest = largest


def compile_program(program, chips: int) -> Compiled:
    """Lower and compile `program` (an `aot.programs.Program`) for the devices its shardings name.
    The compiler's own out-of-memory refusal becomes `OutOfMemory` with the lowered program's biggest tensors."""
    start = time.perf_counter()
    lowered = program.fn.lower(*program.args)
    try:
        compiled = lowered.compile()
    except Exception as e:
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
            raise
        raise OutOfMemory(text.strip().splitlines()[0], largest_tensors(lowered.as_text())) from None
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Compiled(program.name, program.note, mem.argument_size_in_bytes, mem.output_size_in_bytes,
                    mem.alias_size_in_bytes, mem.temp_size_in_bytes, mem.generated_code_size_in_bytes,
                    program.model_flops / chips, float((cost or {}).get("flops", 0.0)), program.tokens, seconds,
                    largest_buffers(compiled.as_text()))
