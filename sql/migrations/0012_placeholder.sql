-- qdworker 0012: a placeholder on the progress branch (issue 15). The dependencies change
-- brings the real 0012 (0012_dependencies.sql); this file is deleted when both are merged.
SELECT 1;
