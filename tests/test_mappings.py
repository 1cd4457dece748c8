"""The translation tables in `mappings/`: what they say (spec sections 5 and 8), and how a bad edit stops
the boot with a message naming the file and the entry."""

import shutil

import pytest

from proxy import mappings

M = mappings.load()


def load_edited(tmp_path, name: str, old: str, new: str) -> str:
    """Load a copy of the tables with one edit; the error message it stops with."""
    folder = tmp_path / "m"
    shutil.copytree(mappings.default_dir(), folder)
    path = folder / f"{name}.toml"
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))
    with pytest.raises(mappings.MappingsError) as e:
        mappings.load(folder)
    return str(e.value)


# --- what the tables say ------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "v3_model", "exact"), [
    ("R-ESRGAN 4x+ Anime6B", "RealESRGAN_x4plus_anime_6B", True),
    ("R-ESRGAN 4x+", "RealESRNet_x4plus", False),
    ("ESRGAN_4x", "RealESRNet_x4plus", False),
    ("4x-UltraSharp", "4x-UltraSharp", True),
    ("LDSR", "RealESRNet_x4plus", False),
    ("SwinIR 4x", "RealESRNet_x4plus", False),
    ("DAT x4", "RealESRNet_x4plus", False),
])
def test__upscalers__model_names_map_as_spec_section_8_says(name, v3_model, exact):
    upscaler = M.upscalers.upscalers[name]
    assert (upscaler.v3_model, upscaler.local, upscaler.exact) == (v3_model, None, exact)


@pytest.mark.parametrize(("name", "local"), [("Lanczos", "LANCZOS"), ("Nearest", "NEAREST"), ("None", "none")])
def test__upscalers__non_models_are_local_and_exact(name, local):
    upscaler = M.upscalers.upscalers[name]
    assert (upscaler.v3_model, upscaler.local, upscaler.exact) == (None, local, True)


def test__upscalers__a_null_upscaler_1_means_the_sdk_default():
    assert M.upscalers.default == "R-ESRGAN 4x+"


def test__upscalers__every_model_is_one_v3_has():
    assert {u.v3_model for u in M.upscalers.upscalers.values() if u.v3_model} <= set(mappings.V3_MODELS)


def test__task_status__maps_v3_statuses_as_spec_section_5_says():
    assert M.task_status == {"TASK_STATUS_QUEUED": 0, "TASK_STATUS_PROCESSING": 1, "TASK_STATUS_UNKNOWN": 1,
                             "TASK_STATUS_SUCCEED": 2, "TASK_STATUS_FAILED": 3}


# --- validation ---------------------------------------------------------------------------------

def test__mappings__unknown_v3_model_stops_the_boot(tmp_path):
    msg = load_edited(tmp_path, "upscalers", '"4x-UltraSharp"\nexact', '"8x-Imaginary"\nexact')
    assert "upscalers.toml" in msg and "v3_model" in msg


def test__mappings__unknown_local_filter_stops_the_boot(tmp_path):
    msg = load_edited(tmp_path, "upscalers", 'local = "LANCZOS"', 'local = "BICUBIC"')
    assert "upscalers.toml" in msg and "Lanczos" in msg and "local" in msg


def test__mappings__an_upscaler_with_both_a_model_and_a_filter_stops_the_boot(tmp_path):
    msg = load_edited(tmp_path, "upscalers", 'local = "NEAREST"', 'local = "NEAREST"\nv3_model = "4x-UltraSharp"')
    assert "upscalers.toml" in msg and "Nearest" in msg and "exactly one of v3_model and local" in msg


def test__mappings__a_default_upscaler_not_listed_stops_the_boot(tmp_path):
    msg = load_edited(tmp_path, "upscalers", 'default = "R-ESRGAN 4x+"', 'default = "R-ESRGAN 5x+"')
    assert "upscalers.toml" in msg and "'R-ESRGAN 5x+' is not listed" in msg


def test__mappings__unknown_v2_code_stops_the_boot(tmp_path):
    msg = load_edited(tmp_path, "errors", "TASK_NOT_FOUND = 3", "TASK_NOT_FOUND = 42")
    assert "errors.toml" in msg and "TASK_NOT_FOUND" in msg


def test__mappings__a_v2_status_out_of_range_stops_the_boot(tmp_path):
    msg = load_edited(tmp_path, "task_status", "TASK_STATUS_FAILED = 3", "TASK_STATUS_FAILED = 5")
    assert "task_status.toml" in msg and "TASK_STATUS_FAILED" in msg


def test__mappings__an_unknown_key_stops_the_boot(tmp_path):
    msg = load_edited(tmp_path, "upscalers", "exact = true", "exact = true\nexcat = false")
    assert "upscalers.toml" in msg and "excat" in msg


def test__mappings__invalid_toml_stops_the_boot_naming_the_file(tmp_path):
    msg = load_edited(tmp_path, "fields", "[", "[[[")
    assert "fields.toml" in msg


def test__mappings__a_missing_table_stops_the_boot_naming_the_file(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(mappings.default_dir(), folder)
    (folder / "task_status.toml").unlink()
    with pytest.raises(mappings.MappingsError) as e:
        mappings.load(folder)
    assert "task_status.toml" in str(e.value)
