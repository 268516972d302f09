"""Entry point: ``python train.py {fit,validate,test,predict,plan,export,sweep} --config configs/<name>.yaml``."""

from train_template.cli import main

if __name__ == "__main__":
    main()
