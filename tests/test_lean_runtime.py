import subprocess
import sys

RUNTIME_MODULES = ["sfedge.runtime", "sfedge.runtime.pipeline", "sfedge.runtime.cli", "sfedge.runtime.llm",
                   "sfedge.runtime.planner", "sfedge.runtime.video", "sfedge.runtime.manifest",
                   "sfedge.runtime.engines", "sfedge.runtime.sessions"]


def test_importing_the_runtime_loads_no_torch():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in RUNTIME_MODULES) +
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'bitsandbytes', "
            "'onnx', 'onnxscript'))\nprint(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"runtime imported: {out.stdout.strip()}"


def test_runtime_modules_never_import_export_side():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "runtime"
    bad = re.compile(r"^\s*(import|from)\s+(torch|transformers|bitsandbytes|onnx\b|sfedge\.export)", re.MULTILINE)
    for f in root.glob("*.py"):
        assert not bad.search(f.read_text()), f"{f.name} imports the export side"
