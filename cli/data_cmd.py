"""`n2a data show`: what a run would train on — size, splits, labels, captions, a contact sheet."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cli.common import console, user_errors
from cli.options import ConfigOption, SetOption, plugin_options, resolve_cli_spec

app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)


def _pick(n_items: int, n: int) -> list[int]:
    """`n` indices spread evenly over the split, so the sheet is not just the first folder."""
    if n_items <= n:
        return list(range(n_items))
    return sorted({round(i * (n_items - 1) / (n - 1)) for i in range(n)}) if n > 1 else [0]


@app.command("show")
@plugin_options
def show(
    config: ConfigOption = None,
    overrides: SetOption = None,
    out: Annotated[Path | None, typer.Option(help="Contact sheet PNG to write (default: data-<source>.png).",
                                             show_default=False)] = None,
    n: Annotated[int, typer.Option("--n", min=1, max=1024, help="Images on the contact sheet.")] = 64,
    top: Annotated[int, typer.Option(min=1, help="How many label counts to list.")] = 10,
    **plugins: str | None,
) -> None:
    """Show the run's data source (OpenMoji by default): sizes, splits, labels, captions, samples."""
    from n2a_core.component import BuildContext
    from n2a_core.images import make_grid_image
    from n2a_core.plugins import get_registry
    from n2a_core.training.batching import collate_samples, make_splits, report_skipped

    with user_errors():
        spec = resolve_cli_spec(config, overrides, plugins)
        data = spec.data
        source = get_registry().build("data", data, BuildContext())
        splits = make_splits(source, data)
        if source.streaming:
            train_records, items = None, []
            for item in splits.train:
                items.append(item)
                if len(items) >= n:
                    break
        else:
            train_records = splits.train.records
            items = [splits.train[i] for i in _pick(len(splits.train), n)]
        report_skipped(splits.train, "data show")
        batch = collate_samples(items)
        if not batch["key"]:
            from n2a_core.errors import DataError

            raise DataError(f"data ({source.name}): none of the {len(items)} sampled images could be read")

    summary = Table(title=f"data: {escape(source.name)}", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("image size", f"{data.image_size} x {data.image_size}")
    if train_records is not None:
        val_records = splits.val.records
        total = len(train_records) + len(val_records)
        summary.add_row("records", f"{total:,}")
        summary.add_row("train / val", f"{len(train_records):,} / {len(val_records):,} "
                                       f"(val_fraction {data.val_fraction}, split_seed {data.split_seed})")
    else:
        summary.add_row("records", "streamed (size unknown)")
    vocabulary = splits.vocabulary
    summary.add_row("labels", f"{len(vocabulary)} distinct" if vocabulary else "none")
    console.print(summary)

    if train_records is not None and vocabulary:
        counts = collections.Counter(r.label for r in train_records + splits.val.records if r.label)
        labels = Table(title=f"top {min(top, len(counts))} labels")
        for column, justify in (("label", "left"), ("records", "right"), ("share", "right")):
            labels.add_column(column, justify=justify)
        total_labelled = sum(counts.values())
        for label, count in counts.most_common(top):
            labels.add_row(escape(label), f"{count:,}", f"{count / total_labelled:.1%}")
        console.print(labels)

    captions = [(k, c) for k, c in zip(batch["key"], batch["caption"], strict=True) if c][:8]
    if captions:
        table = Table(title="captions")
        table.add_column("key")
        table.add_column("caption")
        for key, caption in captions:
            table.add_row(escape(key), escape(caption))
        console.print(table)

    out = out or Path(f"data-{source.name}.png")
    names = [caption or label for caption, label in zip(batch["caption"], batch["label"], strict=True)]
    make_grid_image(batch["image"], captions=names).save(out)
    console.print(f"contact sheet of {len(batch['key'])} training images: [bold]{escape(str(out))}[/bold]")
