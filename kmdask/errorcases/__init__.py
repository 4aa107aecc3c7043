"""Error-case clustering and the specialist experiment: a job extension (the original demo's
stated purpose): train a classifier, cluster its uncertain cases, and measure whether cluster
specialists help."""
