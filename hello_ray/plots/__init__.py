"""Figures of the package that are not the report's own plots: the distilled images' grid
(``image_grid``), shared by the run report and a dataset card."""
