"""`edgekit report`: one HTML page of a build directory."""

from __future__ import annotations

import click

from edgekit.cli.group import cli


@cli.command()
@click.argument("build_dir", type=click.Path())
@click.option("--profiles", multiple=True, type=click.Path(),
              help="Directory (or JSON file) of latency reports: `edgekit profile --save-dir`, `edgekit bench "
                   "--out`; repeat for several. BUILD_DIR itself is always searched.")
@click.option("--rollouts", multiple=True, type=click.Path(),
              help="Directory of staged rollouts' records (default: this build's, from edgekit deploy's own).")
@click.option("--out", "-o", type=click.Path(), help="The HTML file (default: BUILD_DIR/report.html).")
def report(build_dir, profiles, rollouts, out):
    """One self-contained HTML page (inline SVG charts, no network) of what BUILD_DIR's conversion and
    the measurements of its bundles found: sizes, fidelity, latency here and on devices, per-layer
    sensitivity, compatibility, conditions."""
    from edgekit.report import write_report

    click.echo(str(write_report(build_dir, profiles, out, list(rollouts) or None)))
