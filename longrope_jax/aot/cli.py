"""`longrope-jax compile --config F --topology T [--programs train,eval,...] [--config.a.b=value ...]`.

Will this run fit, and how fast could it be? Answered before anyone rents the slice, on any machine
and with no TPU: libtpu's compiler compiles the config's programs for the slice's devices, with
abstract state and batches (no weights, no data, nothing allocated), and reports per chip what it
would hold. The architecture comes from `init_from`'s config.json when that exists here, else from
the config's `model` section. Exit 0 when every program fits in 90% of HBM, 2 when one does not.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from longrope_jax.aot.programs import PROGRAMS, programs
from longrope_jax.aot.report import GIB, OutOfMemory, compile_program
from longrope_jax.aot.topology import MissingLibtpu, parse_topology, tpu_devices
from longrope_jax.rope import RopeScaling

FIT_FRACTION = 0.9  # leave headroom for what the compiler's figure leaves out (runtime, fragmentation)


def model_for(c, say=print):
    """The LlamaConfig to compile: `init_from`'s architecture when its config is here, else `config.model`.
    A LongRoPE factors file that is not here is replaced by PI-like factors: values do not change the program."""
    from longrope_jax.io.artifacts import parse_model_spec, read_model_config
    from longrope_jax.train import config as config_lib

    base = None
    if c.init_from:
        spec = parse_model_spec(c.init_from, "config.init_from")
        try:
            base = read_model_config(spec, "config.init_from")
        except FileNotFoundError:
            say(f"compile: {spec} is not here; the architecture comes from config.model")
    r = c.rope
    if r.type == "longrope" and r.factors_file and not Path(r.factors_file).is_file():
        plain = config_lib.model_config(_with(c, rope={"type": "keep", "mixed_window": False}), base)
        d_half = plain.rope_scaling.rotary_dim(plain.head_dim) // 2
        original = r.original_max_position_embeddings or plain.max_position_embeddings
        factor = max(c.train.seq_len / original, 1.0)
        scaling = RopeScaling("longrope", short_factor=(1.0,) * d_half, long_factor=(factor,) * d_half,
                              original_max_position_embeddings=original, factor=factor)
        say(f"compile: config.rope.factors_file {r.factors_file} is not here; compiling with PI-like factors "
            f"(their values do not change the program)")
        return dataclasses.replace(plain, rope_scaling=scaling, mixed_window=r.mixed_window)
    return config_lib.model_config(c, base)


def _with(c, **sections):
    c = c.copy_and_resolve_references()
    with c.unlocked():
        for name, values in sections.items():
            c[name].update(values)
    return c


def slice_mesh(c, devices):
    """The config's mesh laid over the slice's devices (neighbouring mesh coordinates are neighbouring chips)."""
    from jax.experimental import mesh_utils

    from longrope_jax.sharding.mesh import make_mesh, mesh_shape
    from longrope_jax.sharding.rules import MESH_AXES

    try:
        sizes = mesh_shape(c.mesh.data, c.mesh.fsdp, c.mesh.seq, c.mesh.tensor, len(devices))
    except ValueError as e:
        raise ValueError(f"config.mesh does not match the slice's {len(devices)} chips: {e}") from None
    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    return make_mesh(*sizes, devices=grid.reshape(-1)), dict(zip(MESH_AXES, sizes))


def compile_config(c, topology: str, names=PROGRAMS, say=print) -> list:
    """Compile the named programs of config `c` for `topology`; rows of figures, one per program."""
    from longrope_jax.sharding.rules import rules_from_config
    from longrope_jax.train import config as config_lib

    topo = parse_topology(topology)
    unknown = [n for n in names if n not in PROGRAMS]
    if unknown:
        raise ValueError(f"--programs {','.join(names)}: unknown {unknown}; expected names from {','.join(PROGRAMS)}")
    c = config_lib.resolve(c)
    config_lib.validate(c)  # the numbers `train` would refuse are refused here too
    model_cfg = model_for(c, say)
    devices = tpu_devices(topo)
    mesh, sizes = slice_mesh(c, devices)
    rules = rules_from_config(c.mesh.rules.to_dict() if c.mesh.rules else None)
    config_lib.check_shapes(c, mesh, model_cfg, model_cfg.vocab_size)
    hbm, chips, peak = topo.chip.hbm_bytes, topo.chips, topo.chip.peak_flops
    say(f"compile: {topo.name} ({topo.topology_name}, {chips} chips, {hbm / GIB:.1f} GiB HBM each), mesh {sizes}, "
        f"{model_cfg.num_hidden_layers} layers x {model_cfg.hidden_size}, attention {model_cfg.attention}")
    rows = []
    for program in programs(c, model_cfg, mesh, rules, names):
        try:
            result = compile_program(program, chips)
        except OutOfMemory as e:  # the compiler's own refusal is the figure to show
            row = {"program": program.name, "note": program.note, "fits": False, "error": str(e),
                   "largest_buffers": [f"{b / GIB:.3f} GiB {what}" for b, what in e.largest[:3]]}
        else:
            row = {**result.row(hbm, chips, peak), "fits": result.total <= FIT_FRACTION * hbm}
        row = {"topology": topo.name, **row}
        rows.append(row)
        say(json.dumps(row))
    return rows


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("compile", help="AOT-compile a config's programs for a TPU slice: per-chip memory, "
                                              "FLOPs, projected tokens/s (no TPU needed)", add_help=False,
                              description="longrope-jax compile --config FILE --topology T [--programs a,b] "
                                          "[--config.a.b=value ...]")
    p.add_argument("argv", nargs="*")
    p.set_defaults(func=_compile_cli, passthrough=True)


def _compile_cli(args) -> int:
    from longrope_jax.train import config as config_lib

    argv = list(args.argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print(f"\n--topology: a slice name (v5p-256, v4-128, v5e-64, v6e-8) or a grid (v5p:4x4x8)\n"
              f"--programs: comma-separated, from {','.join(PROGRAMS)} (default: all)")
        return 0
    config, flags = config_lib.parse_config_args(argv, "compile", {
        "topology": "TPU slice: v5p-256, v4-128, v5e-64, v6e-8, or v5p:4x4x8",
        "programs": f"comma-separated subset of {','.join(PROGRAMS)}"})
    if not flags["topology"]:
        raise ValueError("compile: --topology is required (e.g. v5p-256 or v5p:4x4x8)")
    names = tuple(n.strip() for n in (flags["programs"] or ",".join(PROGRAMS)).split(",") if n.strip())
    try:
        rows = compile_config(config, flags["topology"], names, say=lambda s: print(s, flush=True))
    except MissingLibtpu as e:
        print(f"longrope-jax {e}", file=sys.stderr)
        return 1
    bad = [r for r in rows if not r["fits"]]
    for r in bad:
        figure = r.get("error") or f"{r['total_gib']} GiB of {r['hbm_gib']} GiB ({r['hbm_fraction']:.0%})"
        print(f"longrope-jax compile: error: {r['program']} does not fit in {FIT_FRACTION:.0%} of HBM on "
              f"{r['topology']}: {figure}; largest buffers: {', '.join(r['largest_buffers'])}", file=sys.stderr)
    return 2 if bad else 0
