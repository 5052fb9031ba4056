from gateway.cli.hsmctl import main

main()
