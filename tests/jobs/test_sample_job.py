"""The README's first job on the real sample donor (XATL_DATA_DIR): stories260K and TinyStories
uploaded over REST, rebuilt and converted by a real worker, the conversion evaluated beside the
donor and streaming text — with a training budget cut to seconds."""

from service.sample_job import run_sample


def test_the_sample_job_converts_trains_evaluates_and_serves_stories260k(deployment, data_file, tmp_path):
    sample = tmp_path / "sample"
    sample.mkdir()
    for name, relative in (("stories260K.bin", "stories260K/stories260K.bin"), ("tok512.bin", "stories260K/tok512.bin"),
                           ("tinystories_val.txt", "tinystories_val_subset/tinystories_val.txt")):
        (sample / name).symlink_to(data_file(relative).resolve())
    d = deployment().start_api()
    d.start_worker("w0")
    said = []
    jobs = run_sample(d.url, "jobs-test-key", sample, d.settings.resolved_models_dir, tokens=8192, say=said.append)
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], (said, d.log("w0"))
    rebuilt, linear = (j["result"] for j in jobs)
    assert rebuilt["evaluation"]["gap"] == 0.0  # the donor rebuilt is the donor
    assert linear["transfer"]["fraction_transferred"] > 0.9  # xatl+qkv
    assert linear["train"]["tokens"] >= 8192
    profile = {row["context"]: row for row in linear["profile"]["model"]}
    donor_profile = {row["context"]: row for row in linear["profile"]["base"]}
    assert profile[128]["state_bytes"] == profile[512]["state_bytes"]
    assert donor_profile[512]["state_bytes"] > 3 * donor_profile[128]["state_bytes"]
    assert any(line.startswith("stories260K-gla writes: Once upon a time") for line in said)
    # a second run finds both models and submits nothing
    assert run_sample(d.url, "jobs-test-key", sample, d.settings.resolved_models_dir, say=said.append) == []
