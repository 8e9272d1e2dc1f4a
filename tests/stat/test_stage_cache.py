"""stat.stage_cache: runs that share their profiling stages run them once (stat_jax/stat/stage_cache.py)."""

from __future__ import annotations

from stat_jax.stat import io
from tests.stat.test_stat_pipeline import fake, make_config, run, write_fixture  # noqa: F401  (fake: a fixture)

SHARED = ("data", "skills", "label", "rollout", "hard", "diagnose", "profile")


def _config(tmp_path, paths, name, cache, **stat):
    c = make_config(tmp_path, paths, name)
    c.stat.stage_cache = str(cache)
    for k, v in stat.items():
        c.stat[k] = v
    return c


def test_runs_share_stages_through_the_cache_while_what_they_read_is_unchanged(tmp_path, fake):
    paths, _, _ = write_fixture(tmp_path)
    cache = tmp_path / "cache"
    assert set(run(_config(tmp_path, paths, "a", cache), fake).values()) == {"done"}
    paid = fake.count()

    # Another run directory, the same settings: every stage is copied, the teacher is not asked once.
    b = _config(tmp_path, paths, "b", cache)
    assert set(run(b, fake).values()) == {"cached"}
    assert fake.count() == paid
    for f in ("profile/profile.json", "sel/stat_sel.jsonl", "syn/stat_syn.jsonl", "label/skill_map.jsonl"):
        assert (tmp_path / "b/stat" / f).read_bytes() == (tmp_path / "a/stat" / f).read_bytes(), f
    assert set(run(b, fake).values()) == {"skipped"}  # the copies are the run's own now

    # A field only STAT-Sel reads: the stages before it come from the cache, sel runs.
    c = _config(tmp_path, paths, "c", cache, sel_questions_per_skill=1)
    results = run(c, fake)
    assert [n for n, r in results.items() if r != "cached"] == ["sel"] and results["sel"] == "done"
    sel = [io.read_jsonl(tmp_path / f"{r}/stat/sel/stat_sel.jsonl") for r in ("a", "c")]
    assert sel[0] != sel[1]

    # A field the rollout reads: the rollout runs; the scripted student answers as before, so the stages after
    # it find inputs with the same hashes and are copied again.
    d = _config(tmp_path, paths, "d", cache, rollout_temperature=0.3)
    results = run(d, fake)
    assert [n for n in results if results[n] != "cached"] == ["rollout"] and results["rollout"] == "done"


def test_a_damaged_cache_entry_is_never_used(tmp_path, fake):
    paths, _, _ = write_fixture(tmp_path)
    cache = tmp_path / "cache"
    run(_config(tmp_path, paths, "a", cache), fake)
    (stored,) = cache.glob("profile/*/0/files/profile/profile.json")
    stored.write_text('{"skills": []}\n')  # changed after it was stored
    results = run(_config(tmp_path, paths, "b", cache), fake)
    assert results["profile"] == "done" and results["diagnose"] == "cached"
    assert (tmp_path / "b/stat/profile/profile.json").read_bytes() == (
        tmp_path / "a/stat/profile/profile.json").read_bytes()


def test_training_seeds_under_one_stat_seed_share_the_profile(tmp_path, fake):
    """stat.seed fixes the profiling and set-building stages' seed: they never read `seed`, so a sweep over
    training seeds copies every one of them from the first run."""
    paths, _, _ = write_fixture(tmp_path)
    cache = tmp_path / "cache"
    first = _config(tmp_path, paths, "seed0", cache, seed=0)
    assert set(run(first, fake).values()) == {"done"}
    other = _config(tmp_path, paths, "seed7", cache, seed=0)
    other.seed = 7
    assert set(run(other, fake).values()) == {"cached"}
    reads = io.read_json(tmp_path / "seed0/stat/rollout/manifest.json")["reads"]
    assert reads["stat.seed"] == 0 and "seed" not in reads
    # Without stat.seed the stages follow `seed`: another training seed profiles again.
    plain = _config(tmp_path, paths, "plain", tmp_path / "cache2")
    run(plain, fake)
    assert "seed" in io.read_json(tmp_path / "plain/stat/rollout/manifest.json")["reads"]
