"""Page memory that agents on one host share through UCX.

UCX allocates a worker's page tensor (`ucp_mem_map`, from its posix or sysv shared-memory domain) and packs
a remote key for it; a peer on the same host unpacks that key on its endpoint and maps the memory into its
own address space (`ucp_rkey_ptr`). The receiving agent then copies a sender's pages into its own in one
pass, at memcpy speed, where a tagged message through UCX's shared-memory FIFOs is copied twice (in and
out) and moves half as fast. Where UCX cannot map the memory (another host, no shared-memory transport,
GPU memory), `RemotePages.map` says so and the agents use tagged messages. Pages on a CUDA device are shared
the same way through CUDA IPC (`describe_device`, `RemotePages.open_device`): the receiver copies a sender's
pages device to device, where UCX's tagged messages moved them at 84-128 GB/s on an H200 (2026-12-04).

ucxx's Python API has neither memory mapping nor remote keys, so these few UCP calls go through ctypes to
the libucp that ucxx itself loaded, on the handles of ucxx's own objects.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch

from splitserve.kv_transfer.messages import DevicePages, SharedPages

log = logging.getLogger(__name__)

_MAP_FIELDS = 0b111  # UCP_MEM_MAP_PARAM_FIELD_ADDRESS | _LENGTH | _FLAGS
_MAP_ALLOCATE = 1 << 1  # UCP_MEM_MAP_ALLOCATE
_ATTR_FIELDS = 0b11  # UCP_MEM_ATTR_FIELD_ADDRESS | _LENGTH


class _MapParams(ctypes.Structure):  # ucp_mem_map_params_t
    _fields_ = [
        ("field_mask", ctypes.c_uint64),
        ("address", ctypes.c_void_p),
        ("length", ctypes.c_size_t),
        ("flags", ctypes.c_uint),
        ("prot", ctypes.c_uint),
        ("memory_type", ctypes.c_int),
        ("exported_memh_buffer", ctypes.c_void_p),
    ]


class _MemAttr(ctypes.Structure):  # ucp_mem_attr_t
    _fields_ = [
        ("field_mask", ctypes.c_uint64),
        ("address", ctypes.c_void_p),
        ("length", ctypes.c_size_t),
        ("mem_type", ctypes.c_int),
    ]


@functools.cache
def _ucp() -> ctypes.CDLL:
    import libucx

    lib = next(lib for lib in libucx.load_library() if "libucp" in lib._name)
    void_p, p_void_p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
    signatures = {
        "ucp_mem_map": (ctypes.c_int, [void_p, ctypes.POINTER(_MapParams), p_void_p]),
        "ucp_mem_query": (ctypes.c_int, [void_p, ctypes.POINTER(_MemAttr)]),
        "ucp_mem_unmap": (ctypes.c_int, [void_p, void_p]),
        "ucp_rkey_pack": (ctypes.c_int, [void_p, void_p, p_void_p, ctypes.POINTER(ctypes.c_size_t)]),
        "ucp_rkey_buffer_release": (None, [void_p]),
        "ucp_ep_rkey_unpack": (ctypes.c_int, [void_p, ctypes.c_char_p, p_void_p]),
        "ucp_rkey_ptr": (ctypes.c_int, [void_p, ctypes.c_uint64, p_void_p]),
        "ucp_rkey_destroy": (None, [void_p]),
    }
    for name, (restype, argtypes) in signatures.items():
        getattr(lib, name).restype = restype
        getattr(lib, name).argtypes = argtypes
    return lib


def _bytes_at(address: int, nbytes: int) -> torch.Tensor:
    """A uint8 tensor over memory this module owns the lifetime of (no copy)."""
    return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=torch.uint8)


class SharedPageMemory:
    """Host memory allocated by UCX in one context, each allocation shareable with peers on this host."""

    def __init__(self, context_handle: int):
        self._context = ctypes.c_void_p(context_handle)
        self._allocations: list[tuple[ctypes.c_void_p, int, int, bytes]] = []  # (memh, address, nbytes, rkey)

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A zeroed tensor; on the CPU in memory UCX allocated, so that `describe` can share it."""
        if torch.device(device).type != "cpu":
            return torch.zeros(shape, dtype=dtype, device=device)
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        params = _MapParams(field_mask=_MAP_FIELDS, address=None, length=nbytes, flags=_MAP_ALLOCATE)
        memh = ctypes.c_void_p()
        status = _ucp().ucp_mem_map(self._context, ctypes.byref(params), ctypes.byref(memh))
        if status != 0:
            log.warning("UCX could not allocate %d bytes of shared page memory (status %d)", nbytes, status)
            return torch.zeros(shape, dtype=dtype, device=device)
        attr = _MemAttr(field_mask=_ATTR_FIELDS)
        buffer, size = ctypes.c_void_p(), ctypes.c_size_t()
        if (
            _ucp().ucp_mem_query(memh, ctypes.byref(attr)) != 0
            or _ucp().ucp_rkey_pack(self._context, memh, ctypes.byref(buffer), ctypes.byref(size)) != 0
        ):
            _ucp().ucp_mem_unmap(self._context, memh)
            raise RuntimeError("UCX allocated page memory but cannot describe it")
        rkey = ctypes.string_at(buffer, size.value)
        _ucp().ucp_rkey_buffer_release(buffer)
        self._allocations.append((memh, attr.address, nbytes, rkey))
        tensor = _bytes_at(attr.address, nbytes).view(dtype).view(shape)
        tensor.zero_()  # UCX may have fallen back to memory that is not fresh
        return tensor

    def describe(self, tensor: torch.Tensor) -> SharedPages | None:
        """What a peer on this host needs to map `tensor`, or None when it is not in memory allocated here."""
        if tensor.device.type != "cpu":
            return None
        start, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        for _, address, length, rkey in self._allocations:
            if address <= start and start + nbytes <= address + length:
                return SharedPages(rkey=rkey, address=start, nbytes=nbytes)
        return None

    def close(self) -> None:
        """Unmap every allocation: tensors over them must not be touched afterwards."""
        for memh, *_ in self._allocations:
            _ucp().ucp_mem_unmap(self._context, memh)
        self._allocations.clear()


class RemotePages:
    """A peer's `SharedPages`, mapped into this process: `tensor` reads the peer's memory directly."""

    def __init__(self, rkey: ctypes.c_void_p, tensor: torch.Tensor):
        self._rkey = rkey
        self.tensor = tensor

    @classmethod
    def map(cls, endpoint_handle: int, shared: SharedPages) -> RemotePages | None:
        """Map `shared` through the endpoint to its owner; None when UCX cannot (e.g. another host)."""
        rkey, pointer = ctypes.c_void_p(), ctypes.c_void_p()
        if _ucp().ucp_ep_rkey_unpack(ctypes.c_void_p(endpoint_handle), shared.rkey, ctypes.byref(rkey)) != 0:
            return None
        if _ucp().ucp_rkey_ptr(rkey, shared.address, ctypes.byref(pointer)) != 0 or not pointer.value:
            _ucp().ucp_rkey_destroy(rkey)
            return None
        return cls(rkey, _bytes_at(pointer.value, shared.nbytes))

    @classmethod
    def open_device(cls, shared: DevicePages) -> RemotePages | None:
        """Open a sender's CUDA pages (same host, same devices); None where they cannot be opened here."""
        if shared.host != host_id() or not torch.cuda.is_available():
            return None
        try:
            storage = torch.UntypedStorage._new_shared_cuda(
                shared.device, shared.handle, shared.storage_bytes, shared.storage_offset,
                shared.ref_counter_handle, shared.ref_counter_offset, shared.event_handle, shared.event_sync_required,
            )  # fmt: skip
            tensor = torch.empty(0, dtype=torch.uint8, device=f"cuda:{shared.device}")
            tensor.set_(storage, shared.offset, (shared.nbytes,))
        except (RuntimeError, TypeError) as e:
            log.warning("could not open a sender's KV pages through CUDA IPC (tagged messages instead): %s", e)
            return None
        return cls(ctypes.c_void_p(), tensor)

    def close(self) -> None:
        if self._rkey:
            _ucp().ucp_rkey_destroy(self._rkey)
            self._rkey = ctypes.c_void_p()
        self.tensor = torch.empty(0, dtype=torch.uint8)  # (a device mapping closes when its storage is freed)


def host_id() -> str:
    """This host's identity for CUDA IPC: the kernel's boot id (processes in containers on one host share it)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


CUDA_IPC_ENV = "SPLITSERVE_KV_CUDA_IPC"  # 0: never offer CUDA pages through CUDA IPC (tagged messages only)


def describe_device(tensor: torch.Tensor) -> DevicePages | None:
    """What a peer on this host needs to open `tensor`'s CUDA memory (None off CUDA, where it cannot be shared,
    or where SPLITSERVE_KV_CUDA_IPC=0): torch's CUDA IPC, as torch.multiprocessing shares a CUDA tensor."""
    if tensor.device.type != "cuda" or not host_id() or os.environ.get(CUDA_IPC_ENV, "1") == "0":
        return None
    storage = tensor.untyped_storage()
    try:
        device, handle, size, offset, ref_handle, ref_offset, event, sync = storage._share_cuda_()
    except RuntimeError as e:
        log.warning("the KV pages cannot be shared through CUDA IPC: %s", e)
        return None
    return DevicePages(host_id(), device, bytes(handle), size, offset, bytes(ref_handle), ref_offset, bytes(event),
                       bool(sync), tensor.storage_offset() * tensor.element_size(),
                       tensor.numel() * tensor.element_size())  # fmt: skip
