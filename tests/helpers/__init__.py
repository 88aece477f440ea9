"""Code shared by the test modules: test modules import from here, never from each other."""

import pytest

# The helpers assert like tests do; rewriting their asserts keeps pytest's detailed failure messages.
pytest.register_assert_rewrite("tests.helpers")
