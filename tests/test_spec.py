"""The spec: defaults, strictness, and errors that name the file, the API and the field."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from cirrus.spec import (
    RESERVED_NAMES,
    ApiSpec,
    SpecError,
    find_spec_file,
    load_deployments,
    parse_memory,
    parse_specs,
)

PREDICTOR = "class Predictor:\n    def predict(self, payload):\n        return payload\n"


def api(**fields: Any) -> dict[str, Any]:
    """A minimal valid API mapping, with `fields` merged in."""
    return {"name": "sentiment", "predictor": {"path": "predictor.py"}, **fields}


def spec_error(raw: Any, source: str = "proj/cirrus.yaml") -> str:
    with pytest.raises(SpecError) as info:
        parse_specs(raw, source)
    return str(info.value)


def write_project(root: Path, spec: str, files: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cirrus.yaml").write_text(textwrap.dedent(spec))
    for name, text in (files if files is not None else {"predictor.py": PREDICTOR}).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


# --- valid specs and defaults ---------------------------------------------------------------------


def test_minimal_spec_gets_defaults() -> None:
    [spec] = parse_specs(api())
    assert spec.name == "sentiment"
    assert spec.kind == "realtime"
    assert spec.predictor.path == "predictor.py"
    assert spec.predictor.class_name == "Predictor"
    assert spec.predictor.config == {} and spec.predictor.env == {}
    assert (spec.compute.cpu, spec.compute.mem, spec.compute.gpu, spec.compute.accelerators) == (0.0, None, 0, {})
    c = spec.concurrency
    assert (c.max_concurrency, c.inference_slots, c.max_queue_length, c.timeout_s) == (16, 1, 128, 30.0)
    a = spec.autoscaling
    assert (a.min_replicas, a.max_replicas, a.init_replicas, a.initial) == (1, 100, None, 1)


def test_single_mapping_is_a_list_of_one() -> None:
    assert [s.name for s in parse_specs(api())] == [s.name for s in parse_specs([api()])]


def test_class_alias_and_full_spec() -> None:
    [spec] = parse_specs(
        api(
            predictor={"path": "sub/p.py", "class": "Model", "config": {"k": [1, 2]}, "env": {"HF_HOME": "/x"}},
            compute={"cpu": 2, "mem": "2Gi", "gpu": 0.5, "accelerators": {"tpu": 1}},
            concurrency={"max_concurrency": 8, "inference_slots": 8, "max_queue_length": 0, "timeout_s": 2},
            autoscaling={"min_replicas": 0, "max_replicas": 3, "init_replicas": 2},
        )
    )
    assert spec.predictor.class_name == "Model"
    assert spec.predictor.config == {"k": [1, 2]}
    assert spec.compute.mem == 2 * 2**30
    assert spec.autoscaling.initial == 2
    # init_replicas defaults to min_replicas
    assert parse_specs(api(autoscaling={"min_replicas": 3}))[0].autoscaling.initial == 3


def test_spec_is_frozen() -> None:
    [spec] = parse_specs(api())
    with pytest.raises(ValueError):
        spec.name = "other"  # type: ignore[misc]


def test_load_deployments_from_dir_and_file(tmp_path: Path) -> None:
    root = write_project(
        tmp_path / "proj",
        """
        - name: one
          predictor: {path: predictor.py}
        - name: two
          predictor: {path: predictor.py, class: Predictor}
        """,
    )
    deployments = load_deployments(root)
    assert [d.spec.name for d in deployments] == ["one", "two"]
    assert Path(deployments[0].project_dir) == root.resolve()
    assert deployments[0].predictor_file == root.resolve() / "predictor.py"
    assert [d.spec.name for d in load_deployments(root / "cirrus.yaml")] == ["one", "two"]
    assert find_spec_file(root) == root / "cirrus.yaml"


def test_cirrus_yml_is_found_too(tmp_path: Path) -> None:
    (tmp_path / "cirrus.yml").write_text("name: x\npredictor: {path: predictor.py}\n")
    (tmp_path / "predictor.py").write_text(PREDICTOR)
    assert find_spec_file(tmp_path) == tmp_path / "cirrus.yml"
    assert load_deployments(tmp_path)[0].spec.name == "x"


# --- unknown fields -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "path", "allowed"),
    [
        ({"replicas": 2}, "replicas", ["name", "kind", "predictor", "compute", "concurrency", "autoscaling"]),
        ({"predictor": {"path": "p.py", "klass": "X"}}, "predictor.klass", ["path", "class", "config", "env"]),
        ({"compute": {"gpus": 1}}, "compute.gpus", ["cpu", "mem", "gpu", "accelerators"]),
        (
            {"concurrency": {"max_concurency": 4}},
            "concurrency.max_concurency",
            ["max_concurrency", "inference_slots", "max_queue_length", "timeout_s"],
        ),
        (
            {"autoscaling": {"max": 4}},
            "autoscaling.max",
            ["min_replicas", "max_replicas", "init_replicas"],
        ),
    ],
)
def test_unknown_field_names_file_api_path_and_allowed_fields(
    fields: dict[str, Any], path: str, allowed: list[str]
) -> None:
    message = spec_error([api(name="first"), api(name="second", **fields)])
    assert message.startswith("proj/cirrus.yaml: invalid spec")
    line = next(line for line in message.splitlines() if "unknown field" in line)
    assert f"API 'second': {path}: unknown field" in line
    assert f"allowed here: {', '.join(allowed)}" in line
    assert "'first'" not in message


def test_every_error_is_listed() -> None:
    message = spec_error(api(compute={"gpus": 1}, concurrency={"timeout_s": -1}))
    assert "compute.gpus: unknown field" in message
    assert "concurrency.timeout_s:" in message


def test_unknown_field_in_a_loaded_file_names_the_file(tmp_path: Path) -> None:
    root = write_project(tmp_path, "- name: x\n  predictor: {path: predictor.py}\n  compute: {memory: 2Gi}\n")
    with pytest.raises(SpecError) as info:
        load_deployments(root)
    message = str(info.value)
    assert str((root / "cirrus.yaml").resolve()) in message
    assert "API 'x': compute.memory: unknown field; allowed here: cpu, mem, gpu, accelerators" in message


def test_missing_required_fields() -> None:
    message = spec_error({"name": "x"})
    assert "API 'x': (top level): `predictor` is required" in message
    message = spec_error({"predictor": {"path": "p.py"}})
    assert "name: Field required" in message


@pytest.mark.parametrize("raw", [None, [], "just a string", 3])
def test_not_a_list_of_apis(raw: Any) -> None:
    assert "expected a list of APIs" in spec_error(raw)


def test_unsupported_kind() -> None:
    assert "kind:" in spec_error(api(kind="stream"))


# --- splitters ------------------------------------------------------------------------------------


def splitter(**fields: Any) -> dict[str, Any]:
    return {"name": "front", "kind": "splitter", **fields}


def test_a_splitter_names_apis_by_weight_and_shadows() -> None:
    (spec,) = parse_specs(
        splitter(
            apis=[{"name": "a", "weight": 90}, {"name": "b", "weight": 10}, {"name": "c", "shadow": True}],
            sticky_header="X-User",
        )
    )
    assert spec.predictor is None and spec.apis is not None
    assert [(t.name, t.weight, t.shadow) for t in spec.apis] == [("a", 90, False), ("b", 10, False), ("c", None, True)]
    with pytest.raises(SpecError, match="runs no predictor"):
        _ = spec.required_predictor


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, "needs `apis`: at least one API with a weight"),
        ({"apis": [{"name": "c", "shadow": True}]}, "at least one API with a weight"),
        ({"apis": [{"name": "a", "weight": 60}, {"name": "b", "weight": 30}]}, "the weights add up to 90, not 100"),
        ({"apis": [{"name": "a", "weight": 100}, {"name": "a", "shadow": True}]}, "each API once; repeated: a"),
        ({"apis": [{"name": "front", "weight": 100}]}, "cannot send requests to itself"),
        ({"apis": [{"name": "a"}]}, "give it a weight"),
        ({"apis": [{"name": "a", "weight": 100}, {"name": "b", "weight": 5, "shadow": True}]}, "give it no weight"),
        ({"apis": [{"name": "a", "weight": 100}], "predictor": {"path": "p.py"}}, "remove predictor"),
        ({"apis": [{"name": "a", "weight": 100}], "sticky_header": "bad header"}, "sticky_header"),
    ],
)
def test_bad_splitters_are_refused_with_the_reason(fields: dict[str, Any], expected: str) -> None:
    assert expected in spec_error(splitter(**fields))


def test_only_a_splitter_takes_apis() -> None:
    assert "`apis` and `sticky_header` belong to a splitter" in spec_error(api(apis=[{"name": "a", "weight": 100}]))


# --- names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["Sentiment", "a/b", "..", "a" * 64, "1abc", "-abc", "a_b", "a.b", "", "abc\n", " abc", "a b", "é"],
)
def test_bad_api_names(name: str) -> None:
    message = spec_error(api(name=name))
    assert "name:" in message
    assert "is not a valid API name" in message


def test_longest_name_is_accepted() -> None:
    name = "a" + "b-" * 31
    assert len(name) == 63
    assert parse_specs(api(name=name))[0].name == name


@pytest.mark.parametrize("name", sorted(RESERVED_NAMES))
def test_reserved_names(name: str) -> None:
    assert "is reserved" in spec_error(api(name=name))


def test_duplicate_names() -> None:
    message = spec_error([api(name="a"), api(name="b"), api(name="a")])
    assert message == "proj/cirrus.yaml: API 'a' is defined twice"


def test_bad_class_and_env_names() -> None:
    assert "is not a Python class name" in spec_error(api(predictor={"path": "p.py", "class": "my-class"}))
    assert "must be a .py file" in spec_error(api(predictor={"path": "p.txt"}))
    for env in ({"1X": "v"}, {"A-B": "v"}, {"FOO\n": "v"}):
        assert "is not a valid environment variable name" in spec_error(api(predictor={"path": "p.py", "env": env}))


# --- memory ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2Gi", 2 * 2**30),
        ("512Mi", 512 * 2**20),
        ("1.5Gi", int(1.5 * 2**30)),
        ("64Ki", 64 * 1024),
        ("1Ti", 2**40),
        ("1G", 10**9),
        ("250M", 250 * 10**6),
        ("3K", 3000),
        ("1T", 10**12),
        ("1024", 1024),
        (" 2 Gi ", 2 * 2**30),
        (4096, 4096),
        (1.5e9, 1_500_000_000),
        (None, None),
    ],
)
def test_parse_memory(text: Any, expected: int | None) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["2GB", "Gi", "two", "-1Gi", "2gi", "1e9", "", "2 Gi x"])
def test_parse_memory_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a memory size"):
        parse_memory(text)


def test_memory_in_spec() -> None:
    assert parse_specs(api(compute={"mem": "512Mi"}))[0].compute.mem == 512 * 2**20
    assert "compute.mem: '2GB' is not a memory size" in spec_error(api(compute={"mem": "2GB"}))
    assert "compute.mem: memory must not be negative" in spec_error(api(compute={"mem": -1}))


@pytest.mark.parametrize("value", [[1], {"size": 1}, True])
def test_memory_of_the_wrong_type_is_a_spec_error(value: Any) -> None:
    assert "compute.mem:" in spec_error(api(compute={"mem": value}))


# --- bounds ---------------------------------------------------------------------------------------


def test_min_above_max_replicas() -> None:
    message = spec_error(api(autoscaling={"min_replicas": 5, "max_replicas": 2}))
    assert "API 'sentiment': autoscaling: min_replicas (5) exceeds max_replicas (2)" in message


@pytest.mark.parametrize("init", [0, 4])
def test_init_replicas_out_of_bounds(init: int) -> None:
    message = spec_error(api(autoscaling={"min_replicas": 1, "max_replicas": 3, "init_replicas": init}))
    assert f"init_replicas ({init}) must lie between min_replicas (1) and max_replicas (3)" in message


def test_init_replicas_at_bounds() -> None:
    for init in (1, 3):
        spec = parse_specs(api(autoscaling={"min_replicas": 1, "max_replicas": 3, "init_replicas": init}))[0]
        assert spec.autoscaling.initial == init


def test_inference_slots_above_max_concurrency() -> None:
    message = spec_error(api(concurrency={"max_concurrency": 2, "inference_slots": 3}))
    assert "concurrency: inference_slots (3) must not exceed max_concurrency (2)" in message
    assert parse_specs(api(concurrency={"max_concurrency": 3, "inference_slots": 3}))[0].concurrency.inference_slots


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("concurrency", "max_concurrency", 0),
        ("concurrency", "timeout_s", 0),
        ("concurrency", "max_queue_length", -1),
        ("compute", "cpu", -1),
        ("compute", "gpu", -0.5),
        ("autoscaling", "max_replicas", 0),
        ("autoscaling", "min_replicas", -1),
    ],
)
def test_numeric_bounds(section: str, field: str, value: float) -> None:
    assert f"{section}.{field}:" in spec_error(api(**{section: {field: value}}))


# --- predictor paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["../x.py", "sub/../../x.py"])
def test_predictor_path_escaping_the_project(tmp_path: Path, path: str) -> None:
    (tmp_path / "x.py").write_text(PREDICTOR)
    root = write_project(tmp_path / "proj", f"- name: x\n  predictor: {{path: '{path}'}}\n", {"sub/a.py": ""})
    with pytest.raises(SpecError) as info:
        load_deployments(root)
    message = str(info.value)
    assert "API 'x': predictor.path:" in message
    assert "points outside the project directory" in message


def test_absolute_predictor_path(tmp_path: Path) -> None:
    outside = tmp_path / "outside.py"
    outside.write_text(PREDICTOR)
    root = write_project(tmp_path / "proj", f"- name: x\n  predictor: {{path: '{outside}'}}\n")
    with pytest.raises(SpecError, match="points outside the project directory"):
        load_deployments(root)


def test_symlink_out_of_the_project(tmp_path: Path) -> None:
    outside = tmp_path / "outside.py"
    outside.write_text(PREDICTOR)
    root = write_project(tmp_path / "proj", "- name: x\n  predictor: {path: link.py}\n", {})
    (root / "link.py").symlink_to(outside)
    with pytest.raises(SpecError, match="points outside the project directory"):
        load_deployments(root)


def test_missing_predictor_file(tmp_path: Path) -> None:
    root = write_project(tmp_path, "- name: x\n  predictor: {path: nothere.py}\n", {})
    with pytest.raises(SpecError) as info:
        load_deployments(root)
    assert "API 'x': predictor.path:" in str(info.value)
    assert "nothere.py does not exist" in str(info.value)


def test_predictor_in_a_subdirectory(tmp_path: Path) -> None:
    root = write_project(tmp_path, "- name: x\n  predictor: {path: src/model.py}\n", {"src/model.py": PREDICTOR})
    assert load_deployments(root)[0].predictor_file == root.resolve() / "src" / "model.py"


# --- files ----------------------------------------------------------------------------------------


def test_yaml_syntax_error(tmp_path: Path) -> None:
    root = write_project(tmp_path, "- name: x\n  predictor: {path: predictor.py\n")
    with pytest.raises(SpecError) as info:
        load_deployments(root)
    message = str(info.value)
    assert message.startswith(str((root / "cirrus.yaml").resolve()))
    assert "not valid YAML" in message


def test_empty_file(tmp_path: Path) -> None:
    root = write_project(tmp_path, "")
    with pytest.raises(SpecError, match="expected a list of APIs"):
        load_deployments(root)


def test_directory_without_spec(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_deployments(tmp_path)
    assert str(info.value) == f"{tmp_path}: no cirrus.yaml in this directory"


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such file or directory"):
        load_deployments(tmp_path / "nope.yaml")


def test_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "cirrus.yaml").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(SpecError, match="cannot read"):
        load_deployments(tmp_path)


def test_api_spec_model_directly() -> None:
    spec = ApiSpec.model_validate({"name": "x", "predictor": {"path": "p.py", "class": "C"}})
    assert spec.predictor.class_name == "C"
    assert spec.model_dump(by_alias=True)["predictor"]["class"] == "C"


def test_multi_model() -> None:
    models = [{"name": "a", "path": "a.bin"}, {"name": "b", "path": "b.bin"}]
    (spec,) = parse_specs(api(models=models, multi_model={}))
    assert spec.multi_model is not None
    assert (spec.multi_model.cache_size, spec.multi_model.disk_cache_size) == (4, 16)
    assert parse_specs(api())[0].multi_model is None
    assert "multi_model.cache_size: Input should be greater than or equal to 1" in spec_error(
        api(models=models, multi_model={"cache_size": 0})
    )
    assert "multi_model.size: unknown field; allowed here: cache_size, disk_cache_size" in spec_error(
        api(models=models, multi_model={"size": 2})
    )
    assert "list at least one model" in spec_error(api(multi_model={}))
    assert "cannot be combined" in spec_error(api(models=models, multi_model={}, batching={}))
    assert "not to batch APIs" in spec_error(api(kind="batch", models=models, multi_model={}))
