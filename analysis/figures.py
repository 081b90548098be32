"""The paper's figures, from results files (fig2, fig_spectra, fig_sigma) or one run folder (fig_landscape)."""
