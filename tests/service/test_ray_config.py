"""``serve --ray`` replica counts from the command line and the config file, checked before Ray starts: a fixed count,
autoscaling bounds mapped to Ray Serve's ``autoscaling_config``, and bad bounds as one-line typed errors."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from qwenstudio.cli.main import app
from qwenstudio.errors import InvalidRequest
from qwenstudio.service.ray_replica import replica_counts
from qwenstudio.service.service_file import load_service_config


def test_config_file_keys_set_the_replicas_and_map_to_serve_autoscaling(tmp_path):
    path = tmp_path / "service.toml"
    path.write_text("ray_replicas = 2\nray_min_replicas = 1\nray_max_replicas = 4\nray_gpus_per_replica = 1\n")
    config = load_service_config(path, [])
    assert (config.ray_replicas, config.ray_min_replicas, config.ray_max_replicas) == (2, 1, 4)
    assert config.ray_gpus_per_replica == 1.0
    assert replica_counts(config.ray_replicas, config.ray_min_replicas, config.ray_max_replicas) == {
        "num_replicas": "auto",
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2,
                               "target_ongoing_requests": 1}}
    # a command-line option beats the file
    assert load_service_config(path, [], overrides={"ray_replicas": 3}).ray_replicas == 3
    assert replica_counts(3) == {"num_replicas": 3}
    assert replica_counts(2, max_replicas=5)["autoscaling_config"]["min_replicas"] == 2  # --replicas is the floor


def test_bad_replica_settings_are_typed_errors():
    for bad in ({"num_replicas": 0}, {"min_replicas": 3, "max_replicas": 1}, {"max_replicas": 0}):
        with pytest.raises(InvalidRequest) as e:
            replica_counts(**{"num_replicas": 1, **bad})
        assert e.value.code == "invalid_config"


def test_cli_refuses_bad_bounds_and_bad_file_types_in_one_line(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["serve", "--ray", "--replicas", "2", "--min-replicas", "3", "--max-replicas", "1"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip().splitlines() == ["error: replica bounds must satisfy 0 <= min (3) <= max (1) and max >= 1"]
    path = tmp_path / "service.toml"
    path.write_text('ray_replicas = "two"\n')
    r = runner.invoke(app, ["serve", "--ray", "--config", str(path)])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        "error: service.toml: 'ray_replicas' must be an integer"]
