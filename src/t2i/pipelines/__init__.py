"""t2i.pipelines."""
