"""`longrope-jax data prepare`."""



def test_cli_data_prepare_reports_the_splits(tmp_path, capsys):
    from longrope_jax import cli

    assert cli.main(["data", "prepare", "kjv", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "60 train documents, 6 validation documents" in out
    assert cli.main(["data", "prepare", "files:*.txt", "--data-dir", str(tmp_path)]) == 2
