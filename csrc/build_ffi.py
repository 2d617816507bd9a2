"""Generates the cffi (API mode) C source of volcopy._native from the public header.

The cdef is the header itself, with preprocessor lines dropped, so the C compiler checks every
declaration the Python side relies on. CMake runs this and compiles the result; no setuptools step.
"""

import pathlib
import sys

import cffi

# Called by the engine from the copying thread; cffi takes the GIL back for it.
PYTHON_CALLBACKS = 'extern "Python" int _vc_progress_callback(void *, uint64_t, uint64_t);'


def cdef_from_header(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def main() -> None:
    header, output = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    ffi = cffi.FFI()
    ffi.cdef(cdef_from_header(header.read_text()))
    ffi.cdef(PYTHON_CALLBACKS)
    ffi.set_source("volcopy._native", '#include "volcopy.h"')
    output.parent.mkdir(parents=True, exist_ok=True)
    ffi.emit_c_code(str(output))


if __name__ == "__main__":
    main()
