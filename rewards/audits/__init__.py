"""The built-in reward audit set, run with ``pytest --pyargs rewards.audits --audit-task NAME``.

Options and fixtures come from the ``mtrl_reward_audit`` pytest plugin (``rewards.pytest_plugin``).
"""
