import logging

from idgen.utils import loggers


def test_wandb_logger_goes_offline_without_key_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(loggers, "wandb_has_key", lambda: False)
    with caplog.at_level(logging.WARNING):
        logger = loggers.wandb_logger(project="idgen-test", save_dir=str(tmp_path))
    assert logger._offline is True
    assert sum("logging offline" in r.message for r in caplog.records) == 1


def test_wandb_logger_online_with_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(loggers, "wandb_has_key", lambda: True)
    logger = loggers.wandb_logger(project="idgen-test", save_dir=str(tmp_path))
    assert logger._offline is False  # the run itself starts lazily, so nothing is contacted here
