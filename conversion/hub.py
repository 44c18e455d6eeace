"""Pushing a converted folder to the Hub."""

import logging

from . import CONVERTER_VERSION

logger = logging.getLogger("tokenpacker.conversion")


def push_folder_to_hub(folder, repo_id, private=False, commit_message=None):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                      commit_message=commit_message or
                      f"TokenPacker checkpoint converted with convert_tokenpacker_to_hf {CONVERTER_VERSION}")
    logger.info("Pushed %s to https://huggingface.co/%s", folder, repo_id)
    return repo_id
