"""Launching a compiled Triton kernel again without Triton's per-call bookkeeping.

`JITFunction.run` binds ~40 arguments, builds the specialisation list, hashes it into a cache
key and looks the compiled kernel up on every call: ~100 us of host time per launch on the H200
machine's host (benchmarks/decode_profile.py), several times what launching takes. A decode
step of a 1B model makes one attention launch per layer and is bound by the host, so that
bookkeeping alone made a patched step slower than stock.

`launch` keeps the compiled kernel of each (kernel, compile-time arguments, specialisation) and
calls its C launcher directly, with no launch hooks: the `CompiledKernel[grid]` runner would
also look the device and stream up through Triton's driver, build launch metadata and call two
(empty) hook chains from C on every launch. The specialisation is recomputed here by Triton's
own rules for what it specialises on (an integer equal to 1, divisible by 16, its width; a
tensor's dtype and 16-byte alignment), so a call that Triton would compile differently never
reuses the wrong binary: it misses the cache and goes through `JITFunction.run`, which compiles
it. Launch hooks (profilers) and the interpreter always take Triton's own path.

Tensors reach the C launcher as their raw addresses: given a tensor, it calls `data_ptr()` back
in Python and asks the driver whether the address is a device pointer
(`cuPointerGetAttribute`), once per tensor argument on every launch; given an integer it takes
it as is. The addresses are read in the same pass that computes the specialisation, and our
callers have checked the devices before.
"""

from __future__ import annotations

import contextlib

import torch
import triton

from ._checks import interpreter_enabled

__all__ = ["launch", "fast_launch_stats", "tritons_own_launch", "cdiv", "next_power_of_2", "route", "CUSTOM_OP",
           "AUTOGRAD", "PLAIN"]

_COMPILED: dict[tuple, object] = {}
_STATS = {"fast": 0, "slow": 0}
_disabled_reason: str | None = None
# Triton chose interpreted or compiled kernels when they were decorated, at import: so do we.
_INTERPRETED = interpreter_enabled()


def launch(fn, grid, args: tuple, constexprs: dict) -> None:
    """`fn[grid](*args, **constexprs)`, skipping Triton's bookkeeping when it can.

    fn: a `triton.jit` function (not an autotuner). grid: a tuple, or a callable of the
    compile-time arguments as `fn[grid]` takes it. constexprs: every keyword argument, the
    launch options (num_warps, num_stages, ...) included.
    """
    if _disabled_reason is not None or _INTERPRETED or _hooks_set():
        _STATS["slow"] += 1
        fn[grid](*args, **constexprs)
        return
    # A compiled kernel is loaded on one device: the device is part of the key.
    device = torch.cuda.current_device()
    specialisation, addressed_args = _specialise(args)
    key = _cache_key(fn, device, constexprs, specialisation)
    known = _COMPILED.get(key)
    if known is None:
        _STATS["slow"] += 1
        compiled = fn[grid](*args, **constexprs)
        # The compile-time values in signature order follow from the key: kept with the binary.
        _COMPILED[key] = (compiled, _constexpr_params(fn, len(args), constexprs), _c_launcher(compiled))
        return
    compiled, constexpr_params, c_launcher = known
    if callable(grid):
        grid = grid(constexprs)
    grid = tuple(grid) + (1,) * (3 - len(grid))
    try:
        if c_launcher is None:
            compiled[grid](*addressed_args, *constexpr_params)
        else:
            run, function, packed_metadata = c_launcher
            # After the grid, stream and function: launch metadata and the enter/exit hooks, none.
            run(grid[0], grid[1], grid[2], _current_stream(device), function, packed_metadata, None, None, None,
                *addressed_args, *constexpr_params)
    except TypeError as error:  # a Triton whose CompiledKernel or launcher is called differently
        _disable(f"{type(error).__name__}: {error}")
        fn[grid](*args, **constexprs)
        return
    _STATS["fast"] += 1


def _c_launcher(compiled) -> tuple | None:
    """(launcher, function handle, packed metadata) of a compiled kernel, as Triton 3.x's
    `CompiledKernel[grid]` runner passes them on; None where a Triton lays them out otherwise
    (its runner is used then)."""
    try:
        parts = (compiled.run, compiled.function, compiled.packed_metadata)
    except AttributeError:
        return None
    return parts if callable(parts[0]) and parts[1] is not None else None


_STREAM_OF_DEVICE = None


def _current_stream(device: int) -> int:
    """The raw current CUDA stream of `device`, as Triton's driver gives it to its launcher."""
    global _STREAM_OF_DEVICE
    if _STREAM_OF_DEVICE is None:
        from triton.runtime import driver

        _STREAM_OF_DEVICE = driver.active.get_current_stream
    return _STREAM_OF_DEVICE(device)


def fast_launch_stats() -> dict:
    """Launches that took the direct path and Triton's path; why the direct path is off."""
    return {**_STATS, "disabled": _disabled_reason}


@contextlib.contextmanager
def tritons_own_launch():
    """Every launch inside the block goes through `JITFunction.run` (benchmarks compare)."""
    global _disabled_reason
    previous, _disabled_reason = _disabled_reason, "tritons_own_launch() block"
    try:
        yield
    finally:
        _disabled_reason = previous


def _disable(reason: str) -> None:
    global _disabled_reason
    _disabled_reason = reason


_RUNTIME_KNOBS = getattr(getattr(triton, "knobs", None), "runtime", None)


def _hooks_set() -> bool:
    """A profiler's launch hooks need Triton's own path (3.6 keeps them as chains, empty by default)."""
    if _RUNTIME_KNOBS is None:
        return False
    return any(hook is not None and bool(getattr(hook, "calls", True))
               for hook in (_RUNTIME_KNOBS.launch_enter_hook, _RUNTIME_KNOBS.launch_exit_hook))


_INT32_END = 2147483648


def _specialise(args: tuple) -> tuple[tuple, list]:
    """(what Triton compiles a separate binary for, the arguments with each tensor replaced by
    its address), in one pass. Specialised on, per argument: an int's being 1, its divisibility
    by 16, width and sign; a tensor's dtype and 16-byte alignment; a bool's or None's value; a
    float's type; anything else, its value. No calls but `data_ptr` in the loop: this runs for
    ~40 arguments on every launch of a host-bound decode step."""
    key, addressed = [], []
    for arg in args:
        kind = type(arg)
        if kind is int:
            # Most are strides and lengths in [0, 2**31): a small int names the class there.
            if 0 <= arg < _INT32_END:
                key.append(1 if arg == 1 else 16 if arg % 16 == 0 else 0)
            else:
                key.append((arg % 16 == 0, -_INT32_END <= arg < _INT32_END, arg >= 0, arg < 2**63))
            addressed.append(arg)
        elif kind is torch.Tensor or isinstance(arg, torch.Tensor):
            address = arg.data_ptr()
            key.append((arg.dtype, address % 16 == 0))
            addressed.append(address)
        elif kind is float:
            key.append(kind)
            addressed.append(arg)
        else:  # None, bools, anything else: by value
            key.append((kind, arg))
            addressed.append(arg)
    return tuple(key), addressed


def _cache_key(fn, device: int, constexprs: dict, specialisation: tuple) -> tuple:
    """Which compiled kernel serves a call: kernel, device, compile-time arguments, specialisation."""
    return (fn, device, tuple(constexprs.items()), specialisation)


CUSTOM_OP, AUTOGRAD, PLAIN = "custom op", "autograd", "plain"


def route(*tensors: torch.Tensor | None) -> str:
    """How a call reaches the kernels. CUSTOM_OP while torch.compile traces and for tensor
    subclasses (fake tensors, DTensor): they need our torch custom ops. Otherwise AUTOGRAD when
    an input wants gradients, else PLAIN: eager calls skip the ops' dispatch, which is host time
    on every call (~45 us on the H100 machine's host, more with autograd: docs/patching.md). One
    loop: this runs in every attention call of a host-bound decode step."""
    if torch.compiler.is_compiling():
        return CUSTOM_OP
    grad_enabled = torch.is_grad_enabled()
    found = PLAIN
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor:
            return CUSTOM_OP
        if grad_enabled and t.requires_grad:
            found = AUTOGRAD
    return found


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host side: triton.cdiv is a constexpr function, slower to call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as plain Python on the host side."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


_PARAM_NAMES: dict = {}


def _constexpr_params(fn, runtime_count: int, constexprs: dict) -> tuple:
    """The parameters after the first `runtime_count`, from `constexprs`, in signature order:
    what `CompiledKernel` takes after the runtime arguments."""
    names = _PARAM_NAMES.get(fn)
    if names is None:
        names = _PARAM_NAMES[fn] = tuple(fn.arg_names)
    return tuple(constexprs[name] for name in names[runtime_count:])
