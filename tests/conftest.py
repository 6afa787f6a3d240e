import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering for every suite, in every test folder
