"""The hostile inputs of the new surfaces (issue 20), by surface: each module's ``ROWS`` are
rows of ``tests/test_bad_inputs.py``'s table, which runs them; its plain tests check the cases
whose answer is a correct result."""
