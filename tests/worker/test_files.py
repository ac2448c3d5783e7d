"""worker.files: uploads checked, stored and unpacked; every refusal has its code and leaves `dest` empty."""

import io
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from file_builders import (
    TINY_LLAMA2C,
    CountingStream,
    PlantsMarker,
    folder_files,
    llama2c_checkpoint,
    llama2c_tokenizer_bytes,
    make_tar,
    make_zip,
    model_folder_files,
    safetensors_bytes,
    tar_member,
)

import worker.archives as archives
import worker.files as files
from worker.files import FileRejected, Limits, check_safetensors, safe_filename, store_upload, unpack_archive

SMALL = Limits(max_bytes=1 << 20, max_unpacked_bytes=1 << 20, max_members=8)


@pytest.fixture
def dest(tmp_path):
    folder = tmp_path / "upload"
    folder.mkdir()
    return folder


def store(dest, content: bytes, filename: str, purpose: str = "donor", limits=files.DEFAULT_LIMITS):
    return store_upload(io.BytesIO(content), filename, purpose, dest, limits)


def refused(dest, content: bytes, filename: str, purpose: str = "donor", limits=files.DEFAULT_LIMITS) -> FileRejected:
    with pytest.raises(FileRejected) as caught:
        store(dest, content, filename, purpose, limits)
    assert list(dest.iterdir()) == [], "a refusal leaves dest empty"
    return caught.value


def test_the_module_imports_without_torch():
    code = ("import sys, worker.files; heavy = {'torch', 'numpy', 'transformers'} & set(sys.modules); "
            "sys.exit(f'worker.files imported {sorted(heavy)}' if heavy else 0)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


@pytest.mark.parametrize("given, kept", [
    ("notes.txt", "notes.txt"), ("../../etc/passwd.txt", "passwd.txt"), ("C:\\Users\\me\\data.jsonl", "data.jsonl"),
    ("a\x00b\nc\u202etxt.jsonl", "abctxt.jsonl"), ("..", "upload"), ("", "upload"), (None, "upload"),
    ("x" * 300 + ".tar.gz", "x" * 193 + ".tar.gz"),
])
def test_safe_filename(given, kept):
    assert safe_filename(given) == kept


def test_a_name_with_path_parts_is_stored_inside_dest(dest):
    stored = store(dest, b"once upon a time\n", "../../escape.txt", "train")
    assert stored.path == dest / "escape.txt" and not (dest.parent.parent / "escape.txt").exists()


# -- training text -----------------------------------------------------------------------------


def test_text_and_jsonl_are_stored_with_what_was_learnt(dest, tmp_path):
    text = "Once upon a time.\nThé end — 終わり\nno newline at the end".encode()
    stored = store(dest, text, "stories.txt", "train")
    assert (stored.kind, stored.bytes, stored.details) == ("text", len(text), {"lines": 3})
    assert stored.path.read_bytes() == text
    other = tmp_path / "other"
    other.mkdir()
    lines = b'{"text": "a", "id": 1, "src": "x"}\n\n  \n{"text": "b\\u00e9 \\ud83d\\ude00", "src": "y"}\n'
    stored = store(other, lines, "valid.JSONL", "validation")
    assert (stored.kind, stored.details) == ("jsonl", {"lines": 2, "fields": ["src", "text"]})


def test_text_is_checked_across_read_boundaries(dest, monkeypatch):
    monkeypatch.setattr(files, "CHUNK_BYTES", 3)  # every multi-byte character is cut by a boundary
    assert store(dest, "ééé終終\n".encode(), "a.txt", "train").details == {"lines": 1}
    (dest / "a.txt").unlink()
    error = refused(dest, "ab終".encode() + b"\xff rest", "b.txt", "train")
    assert error.code == "not_utf8" and "byte offset 5" in error.message and "b.txt" in error.message
    error = refused(dest, b"abc" + "終".encode()[:2], "c.txt", "train")  # ends inside a character
    assert error.code == "not_utf8" and "byte offset 3" in error.message


@pytest.mark.parametrize("content, code, where", [
    (b"caf\xe9 latin-1\n", "not_utf8", "byte offset 3"),
    (b"text\n\x00\x01\x02binary", "binary_content", "byte offset 5"),
    (b"\xed\xa0\x80 an encoded surrogate", "not_utf8", "byte offset 0"),
    (b"", "empty_file", "empty"),
])
def test_text_that_is_not_utf8_text_is_refused(dest, content, code, where):
    error = refused(dest, content, "data.txt", "train")
    assert (error.code, error.param) == (code, "file") and where in error.message


@pytest.mark.parametrize("content, code, where", [
    (b'{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', "invalid_jsonl", "line 3"),
    (b'{"text": "a"}\n["a", "list"]\n', "invalid_jsonl", "line 2 is a JSON array"),
    (b'{"text": "a"}\n"a string"\n', "invalid_jsonl", "line 2 is a JSON string"),
    (b'{"loss": NaN}\n', "invalid_jsonl", "line 1"),
    (b'{"text": "a\\ud800b"}\n', "invalid_jsonl", "lone surrogate"),
    (b'\n{"text": "caf\xe9"}\n', "not_utf8", "line 2 is not UTF-8: invalid byte(s) at byte offset 14"),
    (b"[" * 100_000 + b"\n", "invalid_jsonl", "line 1"),
    (b"\n  \n", "empty_file", "no JSON lines"),
])
def test_jsonl_names_the_bad_line(dest, content, code, where):
    error = refused(dest, content, "data.jsonl", "train")
    assert error.code == code and where in error.message and "data.jsonl" in error.message


def test_purposes_and_suffixes(dest):
    error = refused(dest, b"x", "a.txt", "fine-tune")
    assert (error.code, error.param) == ("invalid_purpose", "purpose")
    for name, purpose in [("model.bin", "train"), ("a.txt", "donor"), ("weights.pt", "donor"), ("upload", "train"),
                          ("data.csv", "validation")]:
        assert refused(dest, b"x", name, purpose).code == "unsupported_file_type"


def test_an_upload_over_the_limit_stops_being_read(dest):
    stream = CountingStream()  # endless: only stopping early ends the test
    with pytest.raises(FileRejected) as caught:
        store_upload(stream, "big.txt", "train", dest, SMALL)
    assert caught.value.code == "file_too_large" and "1 MiB" in caught.value.message
    assert stream.given <= SMALL.max_bytes + files.CHUNK_BYTES
    assert list(dest.iterdir()) == []


def test_a_refusal_survives_pickling():  # as a Celery task's exception does
    copy = pickle.loads(pickle.dumps(FileRejected("bad", code="invalid_purpose", param="purpose")))
    assert (str(copy), copy.code, copy.param) == ("bad", "invalid_purpose", "purpose")


def test_dest_must_be_an_empty_folder(dest):
    (dest / "left.txt").write_text("x")
    with pytest.raises(ValueError, match="empty folder"):
        store(dest, b"text", "a.txt", "train")


# -- llama2.c, GGUF, pickles -------------------------------------------------------------------


def test_llama2c_checkpoint_and_tokenizer(dest, tmp_path):
    checkpoint = llama2c_checkpoint(tmp_path / "c.bin").read_bytes()
    stored = store(dest, checkpoint, "tiny.bin")
    assert stored.kind == "llama2c_checkpoint" and stored.details == {
        "dim": 8, "hidden_dim": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 260, "seq_len": 4,
        "shared_classifier": True}
    (dest / "tiny.bin").unlink()
    stored = store(dest, llama2c_tokenizer_bytes(), "tok.bin")
    assert (stored.kind, stored.details) == ("llama2c_tokenizer", {"vocab_size": 262, "max_token_length": 6})


@pytest.mark.parametrize("header, size_change, problem", [
    (TINY_LLAMA2C, -4, "truncated"),
    (TINY_LLAMA2C, 4, "implies"),
    ((8, 16, 1, 3, 1, 260, 4), 0, "describes no model"),
    ((0x616B3432, 1, 0, 0, 0, 0, 0), 0, "version-1 export"),
])
def test_a_bin_that_is_no_llama2c_file_is_refused(dest, tmp_path, header, size_change, problem):
    content = llama2c_checkpoint(tmp_path / "c.bin", header, size_change).read_bytes()
    error = refused(dest, content, "donor.bin")
    assert error.code == "invalid_llama2c" and problem in error.message and "tokenizer" in error.message


@pytest.mark.parametrize("header, size_change", [
    (TINY_LLAMA2C, 0), ((8, 16, 2, 2, 2, -260, 4), 0), (TINY_LLAMA2C, -4), ((8, 16, 1, 3, 1, 260, 4), 0),
    ((8, 16, 1, 2, 1, 0, 4), 0), ((0x616B3432, 1, 0, 0, 0, 0, 0), 0),
])
def test_the_checkpoint_check_agrees_with_the_loader(tmp_path, header, size_change):
    from xatl.donors import llama2c
    from xatl.donors.spec import DonorError

    path = llama2c_checkpoint(tmp_path / "c.bin", header, size_change)
    try:
        expected = llama2c.read_header(path)
    except DonorError:
        expected = None
    try:
        details = files.check_llama2c_checkpoint(path)
        assert expected is not None and details["vocab_size"] == abs(expected["vocab_size"])
    except FileRejected:
        assert expected is None


@pytest.mark.parametrize("content", [
    llama2c_tokenizer_bytes(), llama2c_tokenizer_bytes(extra_pieces=()),
    llama2c_tokenizer_bytes(extra_pieces=("a", "a")),
    llama2c_tokenizer_bytes()[:-1], llama2c_tokenizer_bytes().replace(b"<0x41>", b"<0x4X>"),
    llama2c_tokenizer_bytes(extra_pieces=("a", "zz")).replace(b"zz", b"\xff\xfe"),
])
def test_the_tokenizer_check_agrees_with_the_loader(tmp_path, content):
    from xatl.donors.llama2c_tokenizer import read_pieces
    from xatl.donors.spec import DonorError

    path = tmp_path / "tok.bin"
    path.write_bytes(content)
    try:
        expected = len(read_pieces(path)[0])
    except DonorError:
        expected = None
    try:
        assert files.check_llama2c_tokenizer(path)["vocab_size"] == expected
    except FileRejected as error:
        assert expected is None and error.code == "invalid_llama2c"


def test_the_real_stories260k_files(dest, data_file):
    checkpoint, tokenizer = data_file("stories260K/stories260K.bin"), data_file("stories260K/tok512.bin")
    stored = store(dest, checkpoint.read_bytes(), checkpoint.name)
    assert stored.kind == "llama2c_checkpoint" and stored.details["dim"] == 64 and stored.details["vocab_size"] == 512
    assert files.check_llama2c_tokenizer(tokenizer) == {"vocab_size": 512, "max_token_length": 7}
    gguf = files.check_gguf(data_file("smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert gguf["version"] == 3 and gguf["tensor_count"] > 0


def test_gguf(dest):
    header = b"GGUF" + struct.pack("<IQQ", 3, 2, 5)
    details = store(dest, header + bytes(32), "m.gguf").details
    assert details == {"version": 3, "tensor_count": 2, "metadata_kv_count": 5}
    (dest / "m.gguf").unlink()
    assert refused(dest, b"GGUF" + struct.pack("<I", 7) + bytes(16), "m.gguf").code == "invalid_gguf"
    assert refused(dest, b"GGML" + bytes(20), "m.gguf").code == "invalid_gguf"


def test_a_torch_save_donor_is_refused_never_loaded(dest, tmp_path):
    marker = tmp_path / "unpickled"
    buffer = io.BytesIO()
    torch.save({"weights": PlantsMarker(marker)}, buffer)
    assert buffer.getvalue().startswith(b"PK\x03\x04")
    error = refused(dest, buffer.getvalue(), "pytorch_model.bin")
    assert error.code == "pickle_refused" and "data.pkl" in error.message
    assert not marker.exists()


def test_a_bare_pickle_donor_is_refused_never_loaded(dest, tmp_path):
    marker = tmp_path / "unpickled"
    armed = pickle.dumps(PlantsMarker(marker), protocol=4)
    assert refused(dest, armed, "llama.bin").code == "pickle_refused"
    assert not marker.exists()
    pickle.loads(armed)  # the test's own proof that the pickle was armed
    assert marker.exists()


# -- Hugging Face folders in archives ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory) -> dict[str, bytes]:
    """The files of a real (tiny) Llama saved by transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder_files(folder)


@pytest.mark.parametrize("archive, prefix", [("llama.tar.gz", "tiny-llama/"), ("llama.zip", ""), ("llama.tgz", "./"),
                                             ("llama.tar", "a/")])
def test_a_real_model_folder_is_unpacked_and_checked(dest, tmp_path, tiny_hf_model, archive, prefix):
    build = make_zip if archive.endswith(".zip") else make_tar
    upload = build(tmp_path / archive, tiny_hf_model, prefix=prefix)
    stored = store(dest, upload.read_bytes(), archive)
    assert stored.kind == "hf_folder" and stored.path == dest / "llama" and list(dest.iterdir()) == [stored.path]
    assert stored.details["model_type"] == "llama" and stored.details["tensors"] > 0
    assert stored.details["files"] == sorted(tiny_hf_model)
    assert folder_files(stored.path) == tiny_hf_model  # flattened, byte for byte


def test_a_single_top_folder_is_flattened_even_when_it_holds_its_own_name(tmp_path):
    upload = make_tar(tmp_path / "m.tar", {"model/model/config.json": b"{}", "model/model.safetensors": b"x"})
    unpack_archive(upload, tmp_path / "out")
    assert folder_files(tmp_path / "out") == {"model/config.json": b"{}", "model.safetensors": b"x"}
    with pytest.raises(ValueError, match="empty folder"):
        unpack_archive(upload, tmp_path / "out")


def test_macos_metadata_is_left_out(dest, tmp_path):
    upload = make_zip(tmp_path / "m.zip", model_folder_files(), prefix="m/")
    with zipfile.ZipFile(upload, "a") as archive:
        archive.writestr("__MACOSX/m/._config.json", b"\x00\x05\x16\x07AppleDouble")
    assert store(dest, upload.read_bytes(), "m.zip").details["files"] == ["config.json", "model.safetensors"]


def escapes(tmp_path) -> list[Path]:
    return [p for p in (tmp_path / "evil", tmp_path / "evil.txt", Path("/tmp/xatl-evil")) if p.exists()]


@pytest.mark.parametrize("special, problem", [
    (tar_member("../evil.txt", size=4), "climbs out"),
    (tar_member("m/../../evil.txt", size=4), "climbs out"),
    (tar_member("/tmp/xatl-evil", size=4), "absolute path"),
    (tar_member("evil", tarfile.SYMTYPE, linkname="/etc/passwd"), "symbolic link"),
    (tar_member("evil", tarfile.LNKTYPE, linkname="../../etc/passwd"), "hard link"),
    (tar_member("evil", tarfile.CHRTYPE), "device file"),
    (tar_member("evil", tarfile.FIFOTYPE), "fifo"),
    (tar_member("m\\..\\..\\evil.txt", size=4), "backslash"),
])
def test_unsafe_tar_members_are_refused(dest, tmp_path, special, problem):
    upload = make_tar(tmp_path / "m.tar.gz", model_folder_files(), special=[special])
    error = refused(dest, upload.read_bytes(), "m.tar.gz")
    assert error.code == "unsafe_archive_member" and problem in error.message and "m.tar.gz" in error.message
    assert escapes(tmp_path) == []


@pytest.mark.parametrize("name, mode, problem", [
    ("../evil.txt", None, "climbs out"),  # zip slip
    ("/tmp/xatl-evil", None, "absolute path"),
    ("C:/evil.txt", None, "absolute path"),
    ("evil", 0o120777, "symbolic link"),
    ("evil", 0o010644, "special file"),
])
def test_unsafe_zip_members_are_refused(dest, tmp_path, name, mode, problem):
    upload = make_zip(tmp_path / "m.zip", {**model_folder_files(), name: b"/etc/passwd"},
                      mode_bits={name: mode} if mode else None)
    error = refused(dest, upload.read_bytes(), "m.zip")
    assert error.code == "unsafe_archive_member" and problem in error.message
    assert escapes(tmp_path) == []


@pytest.mark.parametrize("archive", ["bomb.zip", "bomb.tar.gz"])
def test_an_archive_bomb_stops_at_the_unpack_limit(dest, tmp_path, archive):
    zeros = bytes(16 << 20)  # 16 MiB of zeros compress to some KiB
    build = make_zip if archive.endswith(".zip") else make_tar
    upload = build(tmp_path / archive, {**model_folder_files(), "zeros.txt": zeros})
    assert upload.stat().st_size < 100_000
    assert refused(dest, upload.read_bytes(), archive, limits=SMALL).code == "archive_too_large"


def test_a_tar_header_of_megabytes_is_not_read(dest, tmp_path):
    upload = make_tar(tmp_path / "m.tar.gz", model_folder_files(),
                      special=[tar_member("x", size=1, pax={"comment": "x" * (2 << 20)})])
    error = refused(dest, upload.read_bytes(), "m.tar.gz", limits=SMALL)
    assert error.code == "invalid_archive" and "header over 1 MiB" in error.message


@pytest.mark.parametrize("archive", ["many.zip", "many.tar"])
def test_too_many_members(dest, tmp_path, archive):
    build = make_zip if archive.endswith(".zip") else make_tar
    upload = build(tmp_path / archive, {**model_folder_files(), **{f"f{i}.txt": b"x" for i in range(20)}})
    error = refused(dest, upload.read_bytes(), archive, limits=SMALL)
    assert error.code == "too_many_members" and "8 entries" in error.message


def test_a_zip_directory_too_large_for_its_entries_is_not_read(dest, tmp_path, monkeypatch):
    monkeypatch.setattr(archives, "CHUNK_BYTES", 1024)  # the directory cap: 8 entries' worth, 8 KiB
    upload = make_zip(tmp_path / "m.zip", {f"{i:04}.txt": b"" for i in range(300)})
    error = refused(dest, upload.read_bytes(), "m.zip", limits=SMALL)
    assert error.code == "too_many_members" and "central directory is over 8 KiB" in error.message


def test_broken_archives(dest, tmp_path):
    assert refused(dest, b"PK\x03\x04 not really a zip", "m.zip").code == "invalid_archive"
    assert refused(dest, b"\x1f\x8b not really gzip", "m.tgz").code == "invalid_archive"
    upload = make_zip(tmp_path / "m.zip", model_folder_files())
    assert refused(dest, upload.read_bytes()[:-30], "m.zip").code == "invalid_archive"  # cut
    upload = make_tar(tmp_path / "m.tar", model_folder_files())
    for cut in (upload.read_bytes()[:1500], upload.read_bytes()[:1024] + b"garbage" * 100):
        error = refused(dest, cut, "m.tar")
        assert error.code == "invalid_archive" and "cut short or corrupt after byte 1024" in error.message
    twice = make_tar(tmp_path / "twice.tar", model_folder_files(), special=[tar_member("config.json", size=2)])
    error = refused(dest, twice.read_bytes(), "twice.tar")
    assert error.code == "invalid_archive" and "clashes" in error.message


# -- what a model folder must hold --------------------------------------------------------------


@pytest.mark.parametrize("replace, code, problem", [
    ({"model.safetensors": safetensors_bytes(header_length=2**63)}, "invalid_safetensors", "over the limit"),
    ({"model.safetensors": safetensors_bytes(header_length=10_000)}, "invalid_safetensors", "truncated"),
    ({"model.safetensors": safetensors_bytes(cut=4)}, "invalid_safetensors", "truncated"),
    ({"model.safetensors": b"\x05\x00\x00\x00\x00\x00\x00\x00nope!"}, "invalid_safetensors", "not JSON"),
    ({"model.safetensors": b"\x05"}, "invalid_safetensors", "shorter than"),
    ({"model.safetensors": safetensors_bytes()[:-2] + bytes(4)}, "invalid_safetensors", "follow the last tensor"),
    ({"config.json": b'{"hidden_size": 8}'}, "invalid_model_folder", "model_type"),
    ({"config.json": b"{oops"}, "invalid_model_folder", "not valid JSON"),
    ({"config.json": None}, "invalid_model_folder", "no config.json"),
    ({"model.safetensors": None, "weights.safetensors": safetensors_bytes()}, "invalid_model_folder", "neither"),
    ({"model.safetensors": None, "model.safetensors.index.json": b'{"weight_map": {"w": "model-1.safetensors"}}'},
     "invalid_model_folder", "lacks model-1.safetensors"),
    ({"model.safetensors": None, "pytorch_model.bin": b"\x80\x02}q\x00."}, "pickle_refused", "pytorch_model.bin"),
    ({"training_args.bin": b"whatever"}, "pickle_refused", "training_args.bin"),
    ({"extra/state.data": pickle.dumps({"a": 1}, protocol=2)}, "pickle_refused", "extra/state.data"),
])
def test_what_a_model_folder_must_hold(dest, tmp_path, replace, code, problem):
    content = {name: data for name, data in {**model_folder_files(), **replace}.items() if data is not None}
    upload = make_zip(tmp_path / "m.zip", content)
    error = refused(dest, upload.read_bytes(), "m.zip")
    assert error.code == code and problem in error.message


def test_a_torch_save_file_in_a_model_folder_is_refused_never_loaded(dest, tmp_path):
    marker = tmp_path / "unpickled"
    buffer = io.BytesIO()
    torch.save(PlantsMarker(marker), buffer)
    for name in ("pytorch_model.bin", "optimizer.state"):  # by its suffix, and by its content
        upload = make_tar(tmp_path / "m.tar", model_folder_files(**{name: buffer.getvalue()}), prefix="m/")
        error = refused(dest, upload.read_bytes(), "m.tar")
        assert error.code == "pickle_refused" and name in error.message
    assert not marker.exists()


def test_sharded_weights_and_every_dtype_size(tmp_path):
    shard = safetensors_bytes({"a": ("I64", [2]), "empty": ("F32", [0, 4]), "scalar": ("F16", [])})
    content = {"config.json": b'{"model_type": "llama"}', "s-1.safetensors": shard, "s-2.safetensors": shard,
               "model.safetensors.index.json": b'{"weight_map": {"a": "s-1.safetensors", "b": "s-2.safetensors"}}'}
    folder = tmp_path / "m"
    folder.mkdir()
    for name, data in content.items():
        (folder / name).write_bytes(data)
    assert files.check_hf_folder(folder)["tensors"] == 6
    (folder / "s-1.safetensors").write_bytes(safetensors_bytes({"a": ("I64", [3])})[:-8])
    with pytest.raises(FileRejected, match="s-1.safetensors"):
        files.check_hf_folder(folder)


def test_check_safetensors_reads_a_real_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3, 5), "b": torch.ones(5, dtype=torch.bfloat16)}, tmp_path / "real.safetensors")
    assert check_safetensors(tmp_path / "real.safetensors") == {"tensors": 2}
