"""`wildseg models`: the open_clip architectures wildseg's methods work with, and their pretrained tags."""

import click
from rich.console import Console
from rich.table import Table


@click.command()
@click.option("--all", "show_all", is_flag=True, help="Also list the architectures wildseg cannot use, with why.")
def models(show_all):
    """List the open_clip architectures both methods work with, and their pretrained tags."""
    import open_clip

    from ..backbone.clip_internals import vision_config_problem

    table = Table("--model", "--pretrained tags", *(["cannot be used"] if show_all else []))
    usable = unusable = 0
    for name in open_clip.list_models():
        config = open_clip.get_model_config(name)
        problem = vision_config_problem(config)
        usable, unusable = usable + (problem is None), unusable + (problem is not None)
        if problem is not None and not show_all:
            continue
        marked = name + (" (+)" if config.get("text_cfg", {}).get("hf_model_name") else "")
        table.add_row(marked, ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "-",
                      *([problem or ""] if show_all else []))
    console = Console()
    console.print(table)
    console.print(f"{usable} architectures work with both methods (relevance, dense); (+): a Hugging Face text tower, "
                  f"pip install transformers. {unusable} have no ViT class-token tower of open_clip's own (ResNet, "
                  "ConvNeXt and other timm towers, CoCa, pooled outputs)"
                  + (": listed with why." if show_all else ": `wildseg models --all` lists them."))
