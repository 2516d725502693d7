"""Tests of the studies and probes (collected by pytest.ini's testpaths beside tests/)."""
